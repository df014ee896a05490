"""What instrumentation costs: decode speed with and without the SAE, and with the hub fanning out.

Every figure comes from Neuroscope's own generation loop (``neuroscope.generation.generate``) on one
loaded ``Session``, so only the instrumentation differs between the modes:

- ``plain``: no SAE set on the backend (``set_saes({}, k)``): the loop, the text decoding and the
  sampling run, no feature is computed and no record is built;
- ``sae``: the session's SAEs: encode and top-k on the device, records built on the host;
- ``hub``: as ``sae``, and every record is published to a ``neuroscope.hub.Hub`` with N subscribers
  draining it on an asyncio loop in another thread, as the SSE server does;
- ``steer`` (with ``steering=``): as ``sae``, with a request's steering and monitors applied at every
  step (``neuroscope.steering``); its cost is also given against ``sae``, the per-step price of
  steering itself.

The modes run alternately, in a rotating order, for several rounds in one process, so that machine
drift (thermal state, other processes, allocator warm-up) hits every mode alike. Within a round the
modes run back to back under the same conditions, so the overhead is taken round by round: the
ratio of the two modes' median decode steps in that round; the reported overhead is the median of
those ratios over the rounds (a median twice over, so that neither a step stalled by another process
nor a round that straddles a change of load decides it). Each mode's decode rate is the inverse of
its median step over all rounds.

On a machine shared with other work, contention only ever adds time, so the same figures are also
given from the fastest step instead of the median ("best"): the speed of an uncontended step, which
is what a quiet machine would show. Decoding is greedy and stop tokens are ignored, so every run
generates exactly the number of tokens asked for.

Backend-neutral: what needs the device (timing an SAE encode alone, the allocator's peak memory)
is asked of the backend through its protocol, so nothing here imports a tensor library.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from neuroscope.backend import SamplingParams
from neuroscope.errors import ConfigError
from neuroscope.generation import generate
from neuroscope.records import GenerationComplete, TokenFeatures
from neuroscope.steering import CompiledSteering, SteeringPlan, parse_plan

DEFAULT_PROMPT = (
    "Explain in a few sentences why the sky is blue during the day and red at sunset, "
    "and what that tells us about how light scatters in the atmosphere."
)
GREEDY = SamplingParams(temperature=0.0)
MODES = ("plain", "sae", "hub")
VERSIONED_PACKAGES = (
    "torch", "transformers", "mlx", "mlx-lm", "numpy", "transformer-lens", "sae-lens",
)  # fmt: skip  # and neuroscope itself, from neuroscope.__version__ (the distribution is neuroscope-sae)

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


# -- one run ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunTiming:
    """One generation, timed from the consumer's side of the event stream.

    ``prefill_s``: start to the first sampled token (prompt forward pass and sampling);
    ``ttft_s``: start to the first decode step, by when the first token's text and every prompt
    record have been yielded; ``step_s``: one entry per generated token, from the start of its
    decode step to the start of the next (the last one: to ``GenerationComplete``), so each covers
    the forward pass, the SAE, sampling, text and records. The last token gets a step too: its
    features need a forward pass.
    """

    mode: str
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    ttft_s: float
    step_s: tuple[float, ...]
    records: int
    token_ids: tuple[int, ...] = ()  # the generated tokens, to check contenders agree

    @property
    def decode_s(self) -> float:
        return sum(self.step_s)

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def best_step_s(self) -> float:
        return min(self.step_s)

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_s

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s


class _TimedBackend:
    """Delegates to a backend and notes when the first token is sampled and each decode starts.

    Timestamps rather than per-call durations: on an asynchronous device (CUDA) a decode call may
    return before its work is done, but ``sample`` reads the logits and so waits for it.
    """

    def __init__(self, backend: Any):
        self._backend = backend
        self.first_sample: float | None = None
        self.decode_starts: list[float] = []
        self.decoded: list[int] = []

    def prefill(self, token_ids: Sequence[int], *args: Any, **kwargs: Any) -> Any:
        return self._backend.prefill(token_ids, *args, **kwargs)

    def sample(self) -> int:
        token = self._backend.sample()
        if self.first_sample is None:
            self.first_sample = time.perf_counter()
        return token

    def decode(self, token_id: int) -> Any:
        self.decode_starts.append(time.perf_counter())
        self.decoded.append(token_id)
        return self._backend.decode(token_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


def fixed_length_tokenizer(tokenizer: Any) -> Any:
    """A shallow copy of the session's tokenizer that never stops early (fixed-length runs)."""
    tokenizer = copy.copy(tokenizer)
    tokenizer.stop_token_ids = frozenset()
    return tokenizer


def run_once(
    session: Any,
    prompt_ids: Sequence[int],
    tokens: int,
    mode: str,
    publish: Callable[[Any], None] | None = None,
    tokenizer: Any = None,
    steering: CompiledSteering | None = None,
) -> RunTiming:
    """Generate ``tokens`` tokens greedily through the full loop with whatever SAEs are set now."""
    backend = _TimedBackend(session.backend)
    records = 0
    start = time.perf_counter()
    events = generate(
        backend, tokenizer or fixed_length_tokenizer(session.tokenizer), session.builder, prompt_ids,  # type: ignore[arg-type]
        request_id=f"bench-{mode}", max_tokens=tokens, sampling=GREEDY, report_bos=session.report_bos,
        steering=steering,
    )  # fmt: skip
    for event in events:
        if isinstance(event, TokenFeatures):
            records += 1
            if publish is not None:
                publish(event)
        elif isinstance(event, GenerationComplete) and publish is not None:
            publish(event)
    end = time.perf_counter()
    if len(backend.decoded) != tokens or backend.first_sample is None:
        raise RuntimeError(f"Expected {tokens} decode steps, the loop ran {len(backend.decoded)}.")
    marks = [*backend.decode_starts, end]
    return RunTiming(
        mode=mode,
        prompt_tokens=len(prompt_ids),
        generated_tokens=tokens,
        prefill_s=backend.first_sample - start,
        ttft_s=marks[0] - start,
        step_s=tuple(b - a for a, b in zip(marks[:-1], marks[1:], strict=True)),
        records=records,
        token_ids=tuple(backend.decoded),
    )


# -- the hub's fan-out ------------------------------------------------------------------------------


class HubFanOut:
    """A ``Hub`` with N subscribers on an asyncio loop in a background thread.

    Each subscriber drains its queue and formats every event as an SSE frame, which is the work the
    features server does per client short of writing to the socket. ``publish`` is what the engine
    calls; the loop thread competes with the generating thread for the GIL, which is part of the cost
    being measured.
    """

    def __init__(self, subscribers: int):
        from neuroscope.hub import Hub

        if subscribers < 1:
            raise ConfigError(f"The hub needs at least one subscriber, got {subscribers}.")
        self.hub = Hub()
        self.received = [0] * subscribers
        self.dropped = [0] * subscribers
        self.sse_bytes = [0] * subscribers
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="bench-hub-loop", daemon=True
        )
        self._thread.start()
        self._tasks: list[asyncio.Task] = []
        asyncio.run_coroutine_threadsafe(self._subscribe(subscribers), self._loop).result(10)

    async def _subscribe(self, n: int) -> None:
        subs = [self.hub.subscribe() for _ in range(n)]
        self._tasks = [asyncio.ensure_future(self._drain(i, sub)) for i, sub in enumerate(subs)]

    async def _shutdown(self) -> None:
        self.hub.close()  # each drain returns once its queue is empty
        await asyncio.gather(*self._tasks)

    async def _drain(self, i: int, sub: Any) -> None:
        from neuroscope.hub import Dropped

        while True:
            batch = await sub.get()
            if batch is None:
                return
            for item in batch:
                if isinstance(item, Dropped):
                    self.dropped[i] += item.count
                    continue
                frame = f"event: {item.name}\ndata: {item.data}\n\n"
                self.sse_bytes[i] += len(frame.encode())
                self.received[i] += 1

    def publish(self, event: Any) -> None:
        self.hub.publish(event)

    def delivered(self) -> list[int]:
        """Per subscriber: events received plus events it was told it lost."""
        return [r + d for r, d in zip(self.received, self.dropped, strict=True)]

    def wait_delivered(self, expected: Sequence[int], timeout: float = 60.0) -> None:
        """Wait until subscriber i has received (or been told it lost) ``expected[i]`` events."""
        deadline = time.monotonic() + timeout
        while any(d < e for d, e in zip(self.delivered(), expected, strict=True)):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Hub subscribers got {self.received} (+{self.dropped} lost) events; "
                    f"expected {list(expected)}."
                )
            time.sleep(0.002)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


# -- host- and device-side figures -----------------------------------------------------------------


def measure_sae_encode(session: Any, layer: int, min_seconds: float = 0.3) -> float | None:
    """Seconds per token of one SAE's encode + top-k + copy of the top-k to the host, in isolation:
    the backend times its own SAE code (``Backend.time_sae_encode``); None where it cannot."""
    sae = session.saes[layer]
    k = min(session.builder.backend_top_k, sae.width)
    return session.backend.time_sae_encode(sae, k, min_seconds)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class RecordCost:
    """Host time per feature record, from one prefill's top-k: filter, label, build, encode."""

    records: int  # per repetition (prompt positions x hooked layers)
    median_us: float
    best_us: float


def measure_record_cost(
    session: Any, prompt_ids: Sequence[int], min_seconds: float = 0.5
) -> RecordCost:
    """The per-token path on the host: ``prompt_records`` (streaming detokenisation, the filter
    over all rows at once, labels, ``TokenFeatures``) and each record's wire encoding (what the hub
    sends), timed over the records of one prompt whose top-k was computed once beforehand."""
    from neuroscope.generation import prompt_records

    features = session.backend.prefill(prompt_ids, GREEDY)
    times: list[float] = []
    count = 0
    deadline = time.perf_counter() + min_seconds
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 200):
        start = time.perf_counter()
        count = 0
        for record in prompt_records(
            session.builder, session.tokenizer, "bench", prompt_ids, features, None,
            session.report_bos,
        ):  # fmt: skip
            record.to_json_bytes()
            count += 1
        times.append(time.perf_counter() - start)
        if count == 0:
            raise RuntimeError("No feature record was built: are the session's SAEs set?")
    per = [t / count * 1e6 for t in times]
    return RecordCost(count, statistics.median(per), min(per))


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    import resource  # POSIX only: imported here so that the CLI still starts on Windows

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# -- the benchmark ----------------------------------------------------------------------------------


def write_random_sae(
    model: str, load_format: str, folder: str | os.PathLike[str], width: int = 16384
) -> str:
    """A random Gemma Scope-shaped JumpReLU SAE for ``model``, as a params.npz under ``folder``.

    For benchmarking models that have no SAE (SmolLM2): the encode costs the same whatever the
    weights. The file's folder names it, and that name becomes the SAE's id in the report.
    """
    import numpy as np

    from neuroscope.loading import resolve_model
    from neuroscope.synthetic import random_sae_arrays

    config_path = resolve_model(model, load_format).path / "config.json"  # type: ignore[arg-type]
    config = json.loads(config_path.read_text())
    d_model = int(config.get("text_config", config)["hidden_size"])
    path = os.path.join(folder, f"random-jumprelu-{width}", "params.npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays: dict[str, Any] = random_sae_arrays(d_model, width, seed=0)
    np.savez(path, **arrays)
    return path


def machine_info() -> dict[str, Any]:
    """Where the figures were taken: CPU, cores, memory, OS, Python and package versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    from neuroscope import __version__

    versions = {"neuroscope": __version__}
    for name in VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1) if memory_gib else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "load_average": load,  # 1, 5, 15 min, at the end: other work on the machine skews figures
    }


@dataclass
class ModeFigures:
    """One mode's figures: decode from the median step of all rounds, the rest medians of runs."""

    decode_tps: float
    decode_step_ms: float  # median
    decode_tps_best: float  # from the fastest step
    prefill_tps: float
    ttft_s: float
    records_per_run: int
    runs: list[dict[str, Any]] = field(default_factory=list)  # prefill_s, ttft_s, step_s (a list)

    @classmethod
    def of(cls, runs: Sequence[RunTiming]) -> ModeFigures:
        step = statistics.median(s for t in runs for s in t.step_s)
        return cls(
            decode_tps=1 / step,
            decode_step_ms=step * 1000,
            decode_tps_best=1 / min(t.best_step_s for t in runs),
            prefill_tps=statistics.median(t.prefill_tps for t in runs),
            ttft_s=statistics.median(t.ttft_s for t in runs),
            records_per_run=runs[0].records,
            runs=[
                {"prefill_s": t.prefill_s, "ttft_s": t.ttft_s, "step_s": list(t.step_s)}
                for t in runs
            ],
        )


@dataclass
class BenchReport:
    model: str
    backend: str
    device: str
    dtype: str
    layer: int
    sae: str
    sae_width: int
    top_k: int
    prompt_tokens: int
    decode_tokens: int
    rounds: int
    subscribers: int
    modes: dict[str, ModeFigures]
    overhead_ratio: float  # median over rounds of the round's median step with the SAE / without
    overhead_ratios_by_round: list[float]
    overhead_ratio_best: float  # the same from each round's fastest steps
    hub_overhead_ratio: float | None  # the same with the hub fanning out, or None if not measured
    hub_overhead_ratios_by_round: list[float]
    hub_overhead_ratio_best: float | None
    hub_events_per_subscriber: int | None
    hub_dropped: int | None
    sae_encode_ms_per_token: float | None  # None where the backend cannot time it alone
    record_us: float  # host time per feature record (build + encode), median
    record_us_best: float
    records_timed: int  # records per timed repetition (prompt positions x hooked layers)
    peak_rss_mib: float
    peak_device_mib: float | None
    machine: dict[str, Any]
    command: list[str] = field(default_factory=list)
    steering: dict[str, Any] | None = None  # the plan of the steer mode, as the chat API echoes it
    steer_overhead_ratio: float | None = None  # steer vs plain, as overhead_ratio
    steer_overhead_ratio_best: float | None = None
    steer_vs_sae_ratio: float | None = None  # steer vs sae: the price of steering itself
    steer_vs_sae_ratios_by_round: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The flat headline figures (what the table prints)."""
        plain, sae = self.modes["plain"], self.modes["sae"]
        hub = self.modes.get("hub")
        return {
            "decode_tps_plain": plain.decode_tps,
            "decode_tps_sae": sae.decode_tps,
            "decode_tps_hub": hub.decode_tps if hub else None,
            "decode_tps_plain_best": plain.decode_tps_best,
            "decode_tps_sae_best": sae.decode_tps_best,
            "prefill_tps_plain": plain.prefill_tps,
            "prefill_tps_sae": sae.prefill_tps,
            "ttft_s_plain": plain.ttft_s,
            "ttft_s_sae": sae.ttft_s,
            "sae_encode_ms_per_token": self.sae_encode_ms_per_token,
            "record_us": self.record_us,
            "record_us_best": self.record_us_best,
            "peak_rss_mib": self.peak_rss_mib,
            "overhead_pct": (self.overhead_ratio - 1) * 100,
            "hub_overhead_pct": (
                (self.hub_overhead_ratio - 1) * 100 if self.hub_overhead_ratio else None
            ),
            "overhead_pct_best": (self.overhead_ratio_best - 1) * 100,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), **asdict(self)}


def check_arguments(*, tokens: int, rounds: int, subscribers: int, warmup: int) -> None:
    """ConfigError for settings that cannot give a figure (checked before a model is loaded)."""
    if tokens < 2:
        raise ConfigError(f"--tokens must be at least 2 (a decode rate needs steps), got {tokens}.")
    if rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {rounds}.")
    if subscribers < 0:
        raise ConfigError(f"--subscribers must be 0 (no hub mode) or more, got {subscribers}.")
    if warmup < 0:
        raise ConfigError(f"--warmup must be 0 or more, got {warmup}.")


def set_instrumented(session: Any, on: bool) -> None:
    """Set the session's SAEs on its backend, or none (the uninstrumented mode)."""
    if on:
        widths = [s.width for s in session.saes.values()]
        session.backend.set_saes(session.saes, min(session.builder.backend_top_k, *widths))
    else:
        session.backend.set_saes({}, session.builder.backend_top_k)


def default_steering(session: Any) -> SteeringPlan:
    """What the steer mode applies at the first hooked layer: a feature add, an ablation and a
    monitor that never fires (so every run generates all its tokens), on every position."""
    layer = session.layers[0]
    return parse_plan(
        [
            {"layer": layer, "feature": 0, "strength": 4.0},
            {"layer": layer, "feature": 1, "mode": "ablate"},
        ],
        [{"layer": layer, "feature": 2, "above": 1e4, "action": "flag"}],
        target=session.steering_target(),
    )


def run_bench(
    session: Any,
    *,
    prompt: str = DEFAULT_PROMPT,
    tokens: int = 32,
    rounds: int = 5,
    subscribers: int = 4,
    warmup: int = 1,
    log: Log = _quiet,
    steering: SteeringPlan | None = None,
) -> BenchReport:
    """Measure ``session`` in every mode, alternately; see the module docstring.

    With ``steering`` (see ``default_steering``), the ``steer`` mode runs too.
    Leaves the session as it found it (its SAEs set).
    """
    check_arguments(tokens=tokens, rounds=rounds, subscribers=subscribers, warmup=warmup)
    prompt_ids = session.encode(prompt)
    tokens = session.check_length(prompt_ids, tokens)
    layer = session.layers[0]
    modes = [m for m in MODES if m != "hub" or subscribers > 0] + (["steer"] if steering else [])
    compiled = None
    if steering:
        decoders = {L: sae.W_dec for L, sae in session.saes.items()}
        compiled = steering.compile(decoders, len(prompt_ids))
    tokenizer = fixed_length_tokenizer(session.tokenizer)
    fan_out = HubFanOut(subscribers) if subscribers > 0 else None
    timings: dict[str, list[RunTiming]] = {m: [] for m in modes}

    def run(mode: str, n: int) -> RunTiming:
        set_instrumented(session, mode != "plain")
        publish = fan_out.publish if mode == "hub" and fan_out else None
        before = fan_out.delivered() if fan_out else []
        steer = compiled if mode == "steer" else None
        timing = run_once(session, prompt_ids, n, mode, publish, tokenizer, steer)
        if publish and fan_out:
            # Outside the timed span, so that one run's backlog never lands in the next one's.
            fan_out.wait_delivered([b + timing.records + 1 for b in before])  # + completion
        return timing

    try:
        for w in range(warmup):
            for mode in modes:
                log(f"warm-up {w + 1}/{warmup}: {mode}")
                run(mode, min(tokens, 8))
        for r in range(rounds):
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            for mode in order:
                t = run(mode, tokens)
                timings[mode].append(t)
                log(
                    f"round {r + 1}/{rounds} {mode:5}: decode {t.decode_tps:8.2f} tok/s · "
                    f"prefill {t.prefill_tps:8.1f} tok/s · TTFT {t.ttft_s * 1000:8.1f} ms"
                )
        set_instrumented(session, True)
        log("SAE encode micro-benchmark")
        encode_s = measure_sae_encode(session, layer)
        log("record building and encoding")
        record_cost = measure_record_cost(session, prompt_ids)
    finally:
        set_instrumented(session, True)
        if fan_out is not None:
            fan_out.close()

    def by_round(mode: str, best: bool = False, base: str = "plain") -> list[float]:
        pairs = zip(timings[mode], timings[base], strict=True)
        if best:
            return [a.best_step_s / b.best_step_s for a, b in pairs]
        return [a.median_step_s / b.median_step_s for a, b in pairs]

    figures = {mode: ModeFigures.of(runs) for mode, runs in timings.items()}
    sae = session.saes[layer]
    return BenchReport(
        model=session.model_name,
        backend=session.backend.name,
        device=session.backend.device,
        dtype=str(getattr(session.backend, "dtype", "?"))
        .replace("torch.", "")
        .replace("mlx.core.", ""),
        layer=layer,
        sae=sae.id,
        sae_width=sae.width,
        top_k=session.builder.top_k,
        prompt_tokens=len(prompt_ids),
        decode_tokens=tokens,
        rounds=rounds,
        subscribers=subscribers,
        modes=figures,
        overhead_ratio=statistics.median(by_round("sae")),
        overhead_ratios_by_round=by_round("sae"),
        overhead_ratio_best=statistics.median(by_round("sae", best=True)),
        hub_overhead_ratio=statistics.median(by_round("hub")) if "hub" in figures else None,
        hub_overhead_ratios_by_round=by_round("hub") if "hub" in figures else [],
        hub_overhead_ratio_best=(
            statistics.median(by_round("hub", best=True)) if "hub" in figures else None
        ),
        hub_events_per_subscriber=min(fan_out.received) if fan_out else None,
        hub_dropped=sum(fan_out.dropped) if fan_out else None,
        sae_encode_ms_per_token=encode_s * 1000 if encode_s is not None else None,
        record_us=record_cost.median_us,
        record_us_best=record_cost.best_us,
        records_timed=record_cost.records,
        peak_rss_mib=peak_rss_mib(),
        peak_device_mib=session.backend.peak_memory_mib(),
        machine=machine_info(),
        steering=steering.to_dict() if steering else None,
        steer_overhead_ratio=statistics.median(by_round("steer")) if steering else None,
        steer_overhead_ratio_best=(
            statistics.median(by_round("steer", best=True)) if steering else None
        ),
        steer_vs_sae_ratio=statistics.median(by_round("steer", base="sae")) if steering else None,
        steer_vs_sae_ratios_by_round=by_round("steer", base="sae") if steering else [],
    )


# -- the table --------------------------------------------------------------------------------------


def _num(x: float) -> str:
    """Three significant digits, no exponent: 0.452, 17.5, 1,240."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def format_table(report: BenchReport) -> str:
    """A plain-text table of one report, for the terminal and for docs/benchmarks.md."""
    r, s = report, report.summary()
    lines = [
        f"model {r.model} · backend {r.backend} ({r.device}, {r.dtype}) · SAE {r.sae} "
        f"(width {r.sae_width}) at layer {r.layer} · top-k {r.top_k}",
        f"prompt {r.prompt_tokens} tokens · {r.decode_tokens} generated tokens · greedy · "
        f"{r.rounds} rounds, modes alternated · decode: median step · others: median run · "
        "vs plain: median over rounds of the paired ratio",
        "",
        f"{'mode':<34}{'decode tok/s':>14}{'vs plain':>10}{'best tok/s':>12}{'vs plain':>10}"
        f"{'prefill tok/s':>15}{'TTFT ms':>10}",
    ]
    names = {
        "plain": "uninstrumented (no SAE)",
        "sae": "instrumented, 1 SAE",
        "hub": f"instrumented + hub, {r.subscribers} subscribers",
        "steer": f"instrumented + steering ({len((r.steering or {}).get('steering', []))} entries)",
    }
    ratios = {
        "plain": (1.0, 1.0),
        "sae": (r.overhead_ratio, r.overhead_ratio_best),
        "hub": (r.hub_overhead_ratio, r.hub_overhead_ratio_best),
        "steer": (r.steer_overhead_ratio, r.steer_overhead_ratio_best),
    }

    def pct(ratio: float | None) -> str:
        return f"{(ratio - 1) * 100:+.1f}%" if ratio is not None else "-"

    for mode, fig in r.modes.items():
        typical, best = ratios[mode]
        lines.append(
            f"{names[mode]:<34}{_num(fig.decode_tps):>14}{pct(typical):>10}"
            f"{_num(fig.decode_tps_best):>12}{pct(best):>10}"
            f"{_num(fig.prefill_tps):>15}{_num(fig.ttft_s * 1000):>10}"
        )
    lines += [
        "",
        "per-round ratios of median decode steps (the spread): "
        + "; ".join(
            f"{name} " + " ".join(f"{x:.2f}" for x in ratios)
            for name, ratios in (
                ("SAE", r.overhead_ratios_by_round),
                ("hub", r.hub_overhead_ratios_by_round),
            )
            if ratios
        ),
        f"instrumentation overhead (decode step, median of {r.rounds} paired rounds): "
        f"{s['overhead_pct']:+.1f}% typical, {s['overhead_pct_best']:+.1f}% best steps"
        + (
            f" · with the hub: {s['hub_overhead_pct']:+.1f}% typical, "
            f"{(r.hub_overhead_ratio_best - 1) * 100:+.1f}% best steps"
            if r.hub_overhead_ratio is not None and r.hub_overhead_ratio_best is not None
            else ""
        ),
        (
            f"SAE encode + top-k + copy to host: {r.sae_encode_ms_per_token:.3f} ms per token"
            if r.sae_encode_ms_per_token is not None
            else "SAE encode: this backend cannot time it alone"
        ),
        f"feature records on the host (filter, labels, build, JSON): {r.record_us:.1f} µs per "
        f"record typical, {r.record_us_best:.1f} µs best ({r.records_timed} records of the prompt)",
        f"peak memory: {r.peak_rss_mib:,.0f} MiB resident"
        + (f", {r.peak_device_mib:,.0f} MiB on the device" if r.peak_device_mib else ""),
    ]
    if r.steer_vs_sae_ratio is not None:
        sae_ms, steer_ms = r.modes["sae"].decode_step_ms, r.modes["steer"].decode_step_ms
        lines.append(
            f"steering (vs instrumented, per decode step): {(r.steer_vs_sae_ratio - 1) * 100:+.1f}% "
            f"({steer_ms - sae_ms:+.3f} ms; rounds "
            + " ".join(f"{x:.2f}" for x in r.steer_vs_sae_ratios_by_round)
            + ")"
        )
    if r.hub_dropped:
        lines.append(f"hub: subscribers lost {r.hub_dropped} events (queues full)")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_PROMPT",
    "BenchReport",
    "HubFanOut",
    "ModeFigures",
    "RunTiming",
    "format_table",
    "check_arguments",
    "default_steering",
    "fixed_length_tokenizer",
    "machine_info",
    "measure_record_cost",
    "measure_sae_encode",
    "run_bench",
    "run_once",
    "set_instrumented",
    "write_random_sae",
]
