"""Independent references: transformers for models, plain numpy for SAEs."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def numpy_sae_encode(
    x: np.ndarray,
    params: dict[str, np.ndarray],
    architecture: str = "jumprelu",
    k: int | None = None,
) -> np.ndarray:
    """The published formulas, written out in numpy, float64."""
    x = x.astype(np.float64)
    pre = x @ params["W_enc"].astype(np.float64) + params["b_enc"]
    if architecture == "jumprelu":
        return pre * (pre > params["threshold"])
    acts = np.maximum(pre, 0.0)
    if architecture == "topk":
        drop = np.argsort(-acts, axis=-1)[..., k:]
        np.put_along_axis(acts, drop, 0.0, axis=-1)
    return acts


def numpy_top_k(acts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-acts, axis=-1, kind="stable")[..., :k]
    return order, np.take_along_axis(acts, order, axis=-1)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def transformers_forward(
    model_dir: Path, token_ids: list[int]
) -> tuple[list[np.ndarray], np.ndarray]:
    """transformers' own hidden states (index L+1 = after block L) and logits, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.inference_mode():
        out = model(torch.tensor([token_ids]), output_hidden_states=True)
    return [h[0].numpy() for h in out.hidden_states], out.logits[0].numpy()


def transformers_greedy(model_dir: Path, token_ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([token_ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n
        )
    return out[0, len(token_ids) :].tolist()
