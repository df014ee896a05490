"""What every contender returns, the rounds that alternate them, and the Neuroscope contenders."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from neuroscope.bench import fixed_length_tokenizer, run_once, set_instrumented


@dataclass(frozen=True)
class PeerRun:
    """One generation of ``len(tokens)`` tokens, timed from the caller's side.

    ``ttft_s``: start to the first generated token in the caller's hands; ``total_s``: start to the
    end, the SAE features included where the contender computes them. ``step_s``: the time between
    consecutive tokens reaching the caller, one per forward pass after the first token (Neuroscope's
    loop makes one more than ``transformers.generate``: the features of the last token need it).
    """

    tokens: tuple[int, ...]
    ttft_s: float
    total_s: float
    step_s: tuple[float, ...]
    feature_positions: int  # positions whose SAE top-k reached the caller (0: uninstrumented)

    @property
    def e2e_tps(self) -> float:
        """Generated tokens per second of the whole request, prefill included."""
        return len(self.tokens) / self.total_s

    @property
    def decode_tps(self) -> float:
        """Forward passes per second after the first token, over this run."""
        return len(self.step_s) / sum(self.step_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ttft_s": self.ttft_s,
            "total_s": self.total_s,
            "e2e_tps": self.e2e_tps,
            "decode_tps": self.decode_tps,
            "step_s": list(self.step_s),
            "feature_positions": self.feature_positions,
        }


def fmt(x: float) -> str:
    """A rate or a duration for a table: three significant digits, no exponent."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def steps(marks: Sequence[float]) -> tuple[float, ...]:
    """Intervals between consecutive timestamps."""
    return tuple(b - a for a, b in zip(marks[:-1], marks[1:], strict=True))


@dataclass
class Contender:
    """A named way of generating (``run(tokens)`` times one generation) and its runs so far."""

    name: str
    label: str  # what it is, in words, for the table
    run: Callable[[int], PeerRun]
    runs: list[PeerRun] = field(default_factory=list)
    phase: int = 0  # contenders of one phase run in the same rounds (their runs pair up)

    def paired_with(self, other: Contender) -> bool:
        return self.phase == other.phase and len(self.runs) == len(other.runs)

    def median(self, figure: str) -> float:
        """The median over runs of a ``PeerRun`` figure."""
        return statistics.median(getattr(r, figure) for r in self.runs)

    @property
    def decode_tps(self) -> float:
        """The inverse of the median step over every run: robust to steps another process stalled."""
        return 1 / statistics.median(s for r in self.runs for s in r.step_s)

    @property
    def decode_tps_best(self) -> float:
        """The inverse of the fastest step: the uncontended speed, on a shared machine."""
        return 1 / min(s for r in self.runs for s in r.step_s)


def run_rounds(
    contenders: Sequence[Contender],
    tokens: int,
    rounds: int,
    warmup_tokens: int,
    log: Callable[[str], None],
    after_round: Callable[[], None] = lambda: None,
) -> None:
    """Warm each contender up, then run every one once per round in a rotating order.

    Rotating the order means none always runs first (or right after a given other one), so drift
    and cache effects spread over all of them; the medians over rounds are reported.
    """
    for c in contenders:
        if warmup_tokens > 0:
            log(f"warm-up: {c.name}")
            c.run(warmup_tokens)
    n = len(contenders)
    for r in range(rounds):
        for c in [*contenders[r % n :], *contenders[: r % n]]:
            run = c.run(tokens)
            if len(run.tokens) != tokens:
                raise RuntimeError(f"{c.name} generated {len(run.tokens)} tokens, not {tokens}.")
            c.runs.append(run)
            log(
                f"round {r + 1}/{rounds} {c.name:18} {run.e2e_tps:9.3f} tok/s end to end · "
                f"decode {run.decode_tps:9.3f} tok/s · TTFT {run.ttft_s * 1000:9.1f} ms"
            )
        after_round()


def neuroscope_contenders(session: Any, prompt_ids: Sequence[int]) -> list[Contender]:
    """Neuroscope's full generation loop (``neuroscope.bench.run_once``) with and without its SAE."""
    tokenizer = fixed_length_tokenizer(session.tokenizer)

    def make(instrumented: bool) -> Callable[[int], PeerRun]:
        def run(tokens: int) -> PeerRun:
            set_instrumented(session, instrumented)
            t = run_once(session, prompt_ids, tokens, "peer", None, tokenizer)
            return PeerRun(
                tokens=t.token_ids,
                ttft_s=t.ttft_s,
                total_s=t.ttft_s + t.decode_s,
                step_s=t.step_s,
                feature_positions=t.records,
            )

        return run

    backend = session.backend.name
    return [
        Contender(
            "neuroscope",
            f"Neuroscope ({backend}), 1 SAE, records built",
            make(True),
        ),
        Contender(
            "neuroscope-plain",
            f"Neuroscope ({backend}), no SAE (same loop)",
            make(False),
        ),
    ]
