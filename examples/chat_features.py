"""Print the top SAE features of every token of a chat reply.

python examples/chat_features.py                          # Gemma 2 2B IT + Gemma Scope layer 20
python examples/chat_features.py --tiny                   # a tiny random model, offline, in seconds
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from neuroscope import Session


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--backend", default="auto")
    parser.add_argument(
        "--tiny", action="store_true", help="use a tiny random Gemma 2 and SAE (no download)"
    )
    args = parser.parse_args()

    options: dict = {"backend": args.backend, "top_k": 5}
    if args.tiny:
        from neuroscope.synthetic import build_random_sae, build_tiny_gemma2

        root = Path(tempfile.mkdtemp())
        options |= {
            "model": str(build_tiny_gemma2(root / "model")),
            "sae_local_path": str(build_random_sae(root / "sae")["npz"]),
            "layer": 2,
        }

    with Session(**options) as session:
        generation = session.generate(args.prompt, max_tokens=args.max_tokens, temperature=0.0)
        for record in generation:
            features = ", ".join(f"{f.label} {f.activation:.1f}" for f in record.top_features[:3])
            print(f"{record.phase:10} {record.position:4} {record.token!r:18} {features}")
        print(f"\nreply: {generation.text!r} ({generation.finish_reason})")


if __name__ == "__main__":
    main()
