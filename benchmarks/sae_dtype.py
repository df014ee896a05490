"""The SAE encode with its encoder in bfloat16 (float32 pre-activations, as the torch backend does
for bf16 models) against the all-float32 encoder, at Gemma Scope shapes, on bf16 residuals:

    python -m benchmarks.sae_dtype --d-model 2304 --width 16384

Prints the largest pre-activation difference relative to the largest pre-activation (for the
backend's product and for a plain bf16 product), the accumulation error alone (against float64 on
the rounded encoder), the agreement of the top-k sets and the share of JumpReLU gates that flip.
A random SAE: real ones have other thresholds (fewer features fire), the same rounding.
"""

from __future__ import annotations

import tempfile
from typing import Annotated

import typer


def main(
    d_model: Annotated[int, typer.Option(help="Residual width.")] = 2304,
    width: Annotated[int, typer.Option(help="SAE features.")] = 16384,
    tokens: Annotated[int, typer.Option(help="Random residuals encoded.")] = 64,
    k: Annotated[int, typer.Option(help="Top-k compared.")] = 64,
) -> None:
    """Print the error figures (see the module docstring)."""
    import numpy as np
    import torch

    from neuroscope.sae import load_local
    from neuroscope.synthetic import build_random_sae
    from neuroscope_torch.sae import TorchSAE, mm_f32

    with tempfile.TemporaryDirectory() as tmp:
        sae = load_local(build_random_sae(tmp, d_model=d_model, width=width)["npz"])
    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.standard_normal((tokens, d_model)) * 3).astype(np.float32))
    x = x.bfloat16()  # a bf16 model's residual
    f32 = TorchSAE(sae, torch.device("cpu"))
    b16 = TorchSAE(sae, torch.device("cpu"), torch.bfloat16)
    with torch.inference_mode():
        inp = x.float() - f32.b_dec if sae.apply_b_dec_to_input else x.float()
        exact = (inp.double() @ torch.from_numpy(sae.W_enc).double()).numpy()
        ours = mm_f32(inp, b16.W_enc).double().numpy()
        plain = (inp.bfloat16() @ b16.W_enc).double().numpy()  # a bf16 product, bf16 result
        rounded = (inp.double() @ b16.W_enc.double()).numpy()  # float64 on the bf16 encoder
        scale = np.abs(exact).max()
        a32, a16 = f32.encode(x), b16.encode(x)
        i32, i16 = a32.topk(k, -1).indices, a16.topk(k, -1).indices
    agree = np.mean(
        [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(i32, i16, strict=True)]
    )
    print(f"pre-activations vs the float32 encoder, / max |pre|: backend (bf16 encoder, float32 "
          f"accumulation) {np.abs(ours - exact).max() / scale:.2e}; plain bf16 product "
          f"{np.abs(plain - exact).max() / scale:.2e}")  # fmt: skip
    print(f"accumulation error alone (vs float64 on the bf16 encoder): "
          f"{np.abs(ours - rounded).max() / scale:.2e}")  # fmt: skip
    print(f"top-{k} sets agree {agree:.4f}; JumpReLU gates flipped "
          f"{((a32 > 0) != (a16 > 0)).float().mean().item():.2e} of features")  # fmt: skip


if __name__ == "__main__":
    typer.run(main)
