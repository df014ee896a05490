"""The MLX ceiling: mlx-lm's ``stream_generate``, no instrumentation, on the MLX backend's weights.

mlx-lm's own model class for the architecture is built and handed the very arrays the backend holds
(MLX arrays are shared, not copied), so both run the same weights in one process. For Gemma 2,
mlx-lm 0.32 attends globally on every layer where Gemma 2 slides a window; below the window (4096
tokens) the two compute the same thing, so at benchmark lengths the comparison is like for like.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from benchmarks.common import Contender, PeerRun, steps
from neuroscope.bench import set_instrumented


def mlx_lm_model(backend: Any) -> Any:
    """mlx-lm's model for the backend's config, holding the backend's arrays."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes  # mlx-lm's own architecture lookup

    model_class, args_class = _get_classes(backend.config)
    model = model_class(args_class.from_dict(backend.config))
    # Neuroscope wraps each block as ``layers.<i>.block``; mlx-lm names it ``layers.<i>``.
    weights = [
        (name.replace(".block.", "."), value)
        for name, value in tree_flatten(backend.model.parameters())
    ]
    model.load_weights(weights, strict=True)
    model.eval()
    return model


def mlx_lm_contender(session: Any, prompt_ids: Sequence[int]) -> Contender:
    from mlx_lm import stream_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    model = mlx_lm_model(session.backend)
    tokenizer = TokenizerWrapper(session.tokenizer.tokenizer)
    tokenizer.eos_token_ids = []  # fixed-length runs, as in Neuroscope's bench

    def run(tokens: int) -> PeerRun:
        set_instrumented(session, False)  # frees nothing here; keeps the device state alike
        start = time.perf_counter()
        marks: list[float] = []
        generated: list[int] = []
        for response in stream_generate(model, tokenizer, list(prompt_ids), max_tokens=tokens):
            generated.append(int(response.token))
            marks.append(time.perf_counter())
        return PeerRun(
            tokens=tuple(generated),
            ttft_s=marks[0] - start,
            total_s=time.perf_counter() - start,
            step_s=steps(marks),
            feature_positions=0,
        )

    return Contender("mlx-lm", "mlx-lm stream_generate, no SAE (MLX ceiling)", run)
