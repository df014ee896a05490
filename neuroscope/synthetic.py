"""Synthetic weights built offline: tiny models and random SAEs (tests, examples, benchmarks) and
the random SAEs behind `--load-format dummy`.

Nothing here downloads. The tiny Gemma 2 (and Gemma 3, which adds q/k norms and local/global
RoPE) exercises every Gemma 2 detail that matters for
correctness: logit soft-capping, ``query_pre_attn_scalar`` different from ``head_dim``, grouped-query
attention, random RMSNorm weights, and a sliding window shorter than the test prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

# Gemma 2's chat template (behaviour as published with the model): no system role, "model" for the
# assistant, each turn closed by <end_of_turn>.
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

TRAINING_TEXT = """\
The capital of France is Paris. Paris is a city on the Seine, known for art and food.
What is the capital of France? The capital of Germany is Berlin; Rome is the capital of Italy.
Language models read tokens and write tokens. Sparse autoencoders find features in the residual stream.
The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Hello! How are you today? I am fine, thank you. Please tell me a story about a cat and a dog.
"""


def build_tokenizer(
    folder: Path, vocab_size: int = 512, chat_template: str = GEMMA2_CHAT_TEMPLATE
) -> None:
    """A byte-level BPE trained on a few sentences, with Gemma's special tokens and chat template.

    ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3, <start_of_turn>=4, <end_of_turn>=5, as in Gemma's order.
    A BOS is prepended to every encoding, as Gemma's tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=GEMMA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TRAINING_TEXT] * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    fast.chat_template = chat_template
    fast.save_pretrained(folder)


def tiny_gemma2_config(vocab_size: int = 512, **overrides: object) -> dict:
    config: dict[str, Any] = {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 24,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    n = int(config["num_hidden_layers"])
    config["layer_types"] = [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)
    ]
    return config


def random_gemma2_weights(
    config: dict, seed: int = 0, scale: float = 0.15
) -> dict[str, np.ndarray]:
    """Random float32 weights in the Hugging Face Gemma 2 naming, RMSNorm weights included."""
    rng = np.random.default_rng(seed)
    d, f = config["hidden_size"], config["intermediate_size"]
    hd, nh, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm() -> np.ndarray:
        return (rng.standard_normal(d) * 0.5).astype(np.float32)

    weights = {
        "model.embed_tokens.weight": w(config["vocab_size"], d) * 0.5,
        "model.norm.weight": norm(),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": w(nh * hd, d),
            p + "self_attn.k_proj.weight": w(nkv * hd, d),
            p + "self_attn.v_proj.weight": w(nkv * hd, d),
            p + "self_attn.o_proj.weight": w(d, nh * hd),
            p + "mlp.gate_proj.weight": w(f, d),
            p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f),
            p + "input_layernorm.weight": norm(),
            p + "post_attention_layernorm.weight": norm(),
            p + "pre_feedforward_layernorm.weight": norm(),
            p + "post_feedforward_layernorm.weight": norm(),
        }
    return weights


def build_tiny_gemma2(folder: str | Path, seed: int = 0, **config_overrides: object) -> Path:
    """A random tiny Gemma 2 in the Hugging Face layout (config, safetensors, tokenizer)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder)
    config = tiny_gemma2_config(**config_overrides)  # type: ignore[arg-type]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 2, "eos_token_id": [1, 5], "pad_token_id": 0}, indent=2)
    )
    save_file(
        random_gemma2_weights(config, seed),
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return folder


# Gemma 3's chat template (behaviour as published with the models): a system message is put at the
# head of the first user turn; otherwise as Gemma 2's.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] | trim + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def tiny_gemma3_config(vocab_size: int = 512, legacy: bool = False, **overrides: object) -> dict:
    """A tiny Gemma 3 text config: hidden size 80, 6 layers, a global layer every third (two global, four sliding),
    a window of 8 tokens, q/k norms, local and global RoPE bases, linear scaling on global layers.

    ``legacy`` writes what older configs on the Hub say (``sliding_window_pattern``,
    ``rope_local_base_freq``, ``rope_scaling``) instead of transformers 5's ``layer_types`` and
    per-layer-type ``rope_parameters``; the model is the same.
    """
    config: dict = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": vocab_size,
        "hidden_size": 80,  # sqrt(80) is not a bfloat16: a normaliser rounded to one would show
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 24,
        "sliding_window": 8,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": [1, 5],
        "pad_token_id": 0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "torch_dtype": "float32",
    }
    pattern, local, glob, factor = 3, 10000.0, 1_000_000.0, 4.0
    config.update(overrides)
    if legacy:
        config |= {
            "sliding_window_pattern": pattern,
            "rope_theta": glob,
            "rope_local_base_freq": local,
            "rope_scaling": {"rope_type": "linear", "factor": factor},
        }
    else:
        config.setdefault(
            "layer_types",
            [
                "sliding_attention" if (i + 1) % pattern else "full_attention"
                for i in range(int(config["num_hidden_layers"]))
            ],
        )
        config["rope_parameters"] = {
            "sliding_attention": {"rope_type": "default", "rope_theta": local},
            "full_attention": {"rope_type": "linear", "rope_theta": glob, "factor": factor},
        }
    return config


def build_tiny_gemma3(
    folder: str | Path, seed: int = 0, legacy: bool = False, **config_overrides: object
) -> Path:
    """A random tiny Gemma 3 (text) in the Hugging Face layout, with Gemma 3's chat template."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder, chat_template=GEMMA3_CHAT_TEMPLATE)
    config = tiny_gemma3_config(legacy=legacy, **config_overrides)  # type: ignore[arg-type]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 2, "eos_token_id": [1, 5], "pad_token_id": 0}, indent=2)
    )
    weights = random_gemma2_weights(config, seed)  # Gemma 2's tensors, plus per-head q/k norms
    rng = np.random.default_rng(seed + 1)
    for i in range(config["num_hidden_layers"]):
        for name in ("q_norm", "k_norm"):
            weights[f"model.layers.{i}.self_attn.{name}.weight"] = (
                rng.standard_normal(config["head_dim"]) * 0.5
            ).astype(np.float32)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def random_sae_arrays(d_model: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Gemma Scope-shaped JumpReLU parameters whose features fire on a fair share of tokens."""
    rng = np.random.default_rng(seed)
    return {
        "W_enc": (rng.standard_normal((d_model, width)) / np.sqrt(d_model)).astype(np.float32),
        "W_dec": (rng.standard_normal((width, d_model)) / np.sqrt(width)).astype(np.float32),
        "b_enc": (rng.standard_normal(width) * 0.1).astype(np.float32),
        "b_dec": (rng.standard_normal(d_model) * 0.1).astype(np.float32),
        "threshold": rng.uniform(0.2, 1.0, width).astype(np.float32),
    }


def build_random_sae(
    folder: str | Path, d_model: int = 64, width: int = 128, seed: int = 0
) -> dict[str, Path]:
    """The same random SAE twice: as a Gemma Scope ``params.npz`` and as a SAELens folder."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    arrays = random_sae_arrays(d_model, width, seed)
    npz = folder / "gemma_scope" / "params.npz"
    npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz, **arrays)  # type: ignore[arg-type]  # numpy's stub reads ** as allow_pickle
    saelens = folder / "saelens"
    saelens.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(saelens / "sae_weights.safetensors"))
    cfg = {
        "architecture": "jumprelu",
        "d_in": d_model,
        "d_sae": width,
        "dtype": "float32",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "hook_name": "blocks.2.hook_resid_post",
    }
    (saelens / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return {"npz": npz, "saelens": saelens}
