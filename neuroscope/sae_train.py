"""``neuroscope sae train``: an SAE for any model at any layer, from a corpus, as a SAELens folder.

The plan (this module; no torch here) and the work (``neuroscope_torch.training``):

* text: a stored corpus (``neuroscope corpus build``) or local files; held-out text from
  ``eval_corpus``, or else a share of the documents kept aside (whole documents, never split);
* contexts: each document's tokens, an end-of-text token between documents, cut into contexts of
  ``context`` tokens that each start with BOS (position 0, never trained on or counted: its huge norm
  is out of distribution and would flatter FVU);
* activations: the residual at the output of block ``layer`` (transformers' ``hidden_states[L+1]``),
  as everywhere in Neuroscope;
* work folder in the cache (``checkpoints/sae-train/...``): stored activations and the trainer's
  checkpoint. Running the same command again continues where it stopped;
* output: ``cfg.json`` + ``sae_weights.safetensors`` (SAELens) + ``training.json`` (the held-out
  evaluation, corpus and timings), loadable with ``--sae-local-path``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from neuroscope.cache import atomic_path, cache_dir, slug, write_json_atomic
from neuroscope.errors import ConfigError

Architecture = Literal["topk", "jumprelu"]
Progress = Callable[[str], None]

# Fewer training tokens than this per latent leaves most latents untrained or dead.
MIN_TOKENS_PER_LATENT = 100
WORK_FORMAT = 1


@dataclass(frozen=True)
class TrainOptions:
    model: str
    layer: int
    output: str
    corpus: str
    eval_corpus: str | None = None
    architecture: Architecture = "topk"
    width: int = 4096
    k: int = 32  # TopK: latents kept per token; JumpReLU: the target mean L0
    context: int = 256
    epochs: float = 4.0
    batch_tokens: int = 4096
    lr: float | None = None
    auxk_alpha: float = 1 / 32
    dead_after_tokens: int = 250_000
    eval_fraction: float = 0.1
    max_train_tokens: int | None = None
    max_eval_tokens: int | None = None
    loss_contexts: int = 64
    weights_dtype: Literal["float16", "float32"] = "float16"
    seed: int = 0
    log_every: int = 50
    save_every: int = 200
    batch_contexts: int = 8
    shard_contexts: int = 64
    harvest_only: bool = False  # store the activations and stop (a helper process, see the CLI)

    def check(self) -> None:
        if self.architecture not in ("topk", "jumprelu"):
            raise ConfigError(
                f"--architecture must be topk or jumprelu, not {self.architecture!r}."
            )
        if self.width < 1 or self.k < 1 or self.k > self.width:
            raise ConfigError(f"--width ({self.width}) and --k ({self.k}) need 1 <= k <= width.")
        if self.context < 3:
            raise ConfigError(f"--context must be at least 3 tokens, not {self.context}.")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction must be between 0 and 1, not {self.eval_fraction}.")
        if self.epochs <= 0 or self.batch_tokens < 1:
            raise ConfigError("--epochs and --batch-tokens must be positive.")
        if self.weights_dtype not in ("float16", "float32"):
            raise ConfigError("--weights-dtype must be float16 or float32.")


@dataclass(frozen=True)
class EvalReport:
    """The held-out evaluation (position 0 excluded everywhere)."""

    tokens: int
    fvu: float
    mean_l0: float
    dead_fraction: float
    dead: int
    loss_tokens: int
    clean_loss: float
    spliced_loss: float

    @property
    def loss_increase(self) -> float:
        return self.spliced_loss - self.clean_loss

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"loss_increase": self.loss_increase}

    def describe(self) -> str:
        return (
            f"held-out ({self.tokens:,} tokens): FVU {self.fvu:.3f}, mean L0 {self.mean_l0:.1f}, "
            f"dead {self.dead:,} ({self.dead_fraction:.1%}); next-token loss {self.clean_loss:.3f} -> "
            f"{self.spliced_loss:.3f} (+{self.loss_increase:.3f}) over {self.loss_tokens:,} tokens"
        )


# -- text to contexts ------------------------------------------------------------------------------


def split_documents(
    texts: Sequence[str], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Whole documents aside for evaluation: a seeded ``fraction`` of them (at least one)."""
    if len(texts) < 2:
        raise ConfigError(
            "The corpus has a single document: nothing can be held out. Give --eval-corpus, or a "
            "corpus with more samples."
        )
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(texts) * fraction))
    held = set(order[:n_eval])
    train = [t for i, t in enumerate(texts) if i not in held]
    return train, [t for i, t in enumerate(texts) if i in held]


def pack_contexts(
    documents: Sequence[Sequence[int]], first_token: int, separator: int, context: int
) -> np.ndarray:
    """[n, context] int32: the documents joined by ``separator``, cut into rows of ``context - 1``
    tokens, each row after ``first_token`` (BOS). The last, partial row is dropped."""
    stream: list[int] = []
    for doc in documents:
        stream.extend(doc)
        stream.append(separator)
    body = context - 1
    rows = len(stream) // body
    out = np.empty((rows, context), dtype=np.int32)
    out[:, 0] = first_token
    if rows:
        out[:, 1:] = np.asarray(stream[: rows * body], dtype=np.int32).reshape(rows, body)
    return out


def tokenize_documents(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(ids) for ids in encoded]


def special_tokens(tokenizer: Any) -> tuple[int, int]:
    """(position-0 token, document separator): BOS and EOS, whichever exist."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    first = bos if bos is not None else eos
    separator = eos if eos is not None else bos
    if first is None or separator is None:
        raise ConfigError(
            "The tokenizer has neither a BOS nor an EOS token to start contexts with."
        )
    return int(first), int(separator)


def check_budget(train_tokens: int, options: TrainOptions) -> None:
    """Refuse, before any model runs, a corpus too small for the width asked for."""
    needed = options.width * MIN_TOKENS_PER_LATENT
    if train_tokens < needed:
        fits = max(1, train_tokens // MIN_TOKENS_PER_LATENT)
        raise ConfigError(
            f"The training text has {train_tokens:,} tokens (position 0 of each context excluded), too "
            f"few for {options.width:,} latents: at least {MIN_TOKENS_PER_LATENT} tokens per latent "
            f"({needed:,}) are needed. Give more text (a larger --corpus or `neuroscope corpus build "
            f"--samples N`) or a smaller --width (at most {fits:,} for this corpus)."
        )


# -- output ----------------------------------------------------------------------------------------


def saelens_cfg(options: TrainOptions, d_in: int, model_name: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architecture": options.architecture,
        "d_in": d_in,
        "d_sae": options.width,
        "dtype": options.weights_dtype,
        "device": "cpu",
        "model_name": model_name,
        "hook_name": f"blocks.{options.layer}.hook_resid_post",
        "hook_layer": options.layer,
        "hook_head_index": None,
        "context_size": options.context,
        "prepend_bos": True,
        "normalize_activations": "none",
        "apply_b_dec_to_input": options.architecture == "topk",
        "dataset_path": options.corpus,
    }
    if options.architecture == "topk":
        cfg["k"] = options.k
    return cfg


def write_output(
    folder: Path,
    params: dict[str, np.ndarray],
    cfg: dict[str, Any],
    training: dict[str, Any],
    dtype: str,
) -> None:
    """cfg.json and sae_weights.safetensors (SAELens), then training.json; each file atomically."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    # Only the matrices take the smaller dtype: a bias rounded to float16 can be off by more than the
    # spread of the activations around it (residuals with a large mean), which would wreck the FVU.
    arrays = {
        k: np.ascontiguousarray(v.astype(dtype if v.ndim == 2 else np.float32))
        for k, v in params.items()
    }
    with atomic_path(folder / "sae_weights.safetensors") as tmp:
        save_file(arrays, str(tmp))
    write_json_atomic(folder / "cfg.json", cfg)
    write_json_atomic(folder / "training.json", training)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def work_folder(model_name: str, layer: int, data_identity: dict[str, Any]) -> Path:
    name = Path(model_name).name if model_name.startswith((".", "/", "~")) else model_name
    return (
        cache_dir("checkpoints") / "sae-train" / f"{slug(name)}-L{layer}-{_digest(data_identity)}"
    )


# -- the whole run ---------------------------------------------------------------------------------


@dataclass
class TrainResult:
    output: Path
    report: EvalReport
    train_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)


def train_sae(options: TrainOptions, progress: Progress = print) -> TrainResult | None:
    """Harvest (resumable), train (resumable), evaluate on held-out text, write the SAELens folder."""
    options.check()
    from neuroscope.chat import ChatTokenizer
    from neuroscope.corpus import open_corpus
    from neuroscope.loading import resolve_model

    try:
        from neuroscope_torch import training
    except ImportError as e:
        raise ConfigError(
            f"`neuroscope sae train` runs on torch, which is not installed ({e.name or e}). "
            "Install it with: pip install -e '.[torch,train]'"
        ) from None

    timings: dict[str, float] = {}
    t = time.monotonic()
    corpus = open_corpus(options.corpus)
    if options.eval_corpus:
        train_texts, eval_texts = corpus.texts, open_corpus(options.eval_corpus).texts
    else:
        train_texts, eval_texts = split_documents(corpus.texts, options.eval_fraction, options.seed)
    resolved = resolve_model(options.model)
    tokenizer = ChatTokenizer(resolved.path).tokenizer
    first, separator = special_tokens(tokenizer)
    train_ctx = pack_contexts(
        tokenize_documents(tokenizer, train_texts), first, separator, options.context
    )
    eval_ctx = pack_contexts(
        tokenize_documents(tokenizer, eval_texts), first, separator, options.context
    )
    # Shuffled, so that a token budget or a shard takes from every source, not the first documents.
    rng = np.random.default_rng(options.seed)
    train_ctx, eval_ctx = (
        train_ctx[rng.permutation(len(train_ctx))],
        eval_ctx[rng.permutation(len(eval_ctx))],
    )
    # Shards hold consecutive contexts of these orders, so a budget given later reuses them.
    full_digest = {name: hashlib.sha256(ctx.tobytes()).hexdigest()
                   for name, ctx in (("train", train_ctx), ("eval", eval_ctx))}  # fmt: skip
    if options.max_train_tokens:
        train_ctx = train_ctx[: math.ceil(options.max_train_tokens / (options.context - 1))]
    if options.max_eval_tokens:
        eval_ctx = eval_ctx[: math.ceil(options.max_eval_tokens / (options.context - 1))]
    train_tokens = len(train_ctx) * (options.context - 1)
    check_budget(train_tokens, options)
    if len(eval_ctx) == 0:
        raise ConfigError(
            f"The held-out text is shorter than one context of {options.context} tokens. Give a "
            "larger --eval-corpus or --eval-fraction, or a smaller --context."
        )
    timings["tokenize"] = time.monotonic() - t
    progress(
        f"{len(train_ctx):,} training contexts ({train_tokens:,} tokens), {len(eval_ctx):,} held-out "
        f"({len(eval_ctx) * (options.context - 1):,} tokens) of {options.context} tokens"
    )

    data_identity = {
        "format": WORK_FORMAT,
        "model": str(resolved.path),
        "layer": options.layer,
        "train": full_digest["train"],
        "eval": full_digest["eval"],
        "shard": options.shard_contexts,
    }
    work = work_folder(resolved.name, options.layer, data_identity)
    (work / "acts").mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / "data.json", data_identity)
    for name, ctx in (("train_contexts.npy", train_ctx), ("heldout_contexts.npy", eval_ctx)):
        with atomic_path(work / name) as tmp, open(tmp, "wb") as f:  # token ids behind the rows
            np.save(f, ctx)
    progress(f"work folder (activations, checkpoints): {work}")

    model = training.load_model(resolved.path)
    num_layers = len(training._blocks(model))
    if not 0 <= options.layer < num_layers:
        raise ConfigError(
            f"Layer {options.layer} is out of range: {options.model} has {num_layers} decoder blocks, "
            f"numbered 0 to {num_layers - 1}."
        )
    t = time.monotonic()
    acts_dir = work / "acts"

    def harvest(contexts: np.ndarray, prefix: str) -> list[Path]:
        return training.harvest(model, options.layer, contexts, acts_dir, prefix,
                                options.shard_contexts, options.batch_contexts, progress)  # fmt: skip

    train_shards = harvest(train_ctx, "train")
    timings["harvest"] = time.monotonic() - t
    if options.harvest_only:
        harvest(eval_ctx, "heldout")
        progress(f"activations stored in {acts_dir}")
        return None

    t = time.monotonic()
    train_identity = {k: v for k, v in asdict(options).items() if k not in
                      ("output", "log_every", "loss_contexts", "max_eval_tokens", "harvest_only")}  # fmt: skip
    checkpoint = work / f"train-{_digest(train_identity)}.pt"
    acts = training.load_shards(train_shards)
    sae, info = training.train(options, acts, checkpoint, progress)
    del acts
    timings["train"] = time.monotonic() - t

    # Held-out activations after training: a --harvest-only helper may be storing them meanwhile.
    t = time.monotonic()
    eval_shards = harvest(eval_ctx, "heldout")
    timings["harvest"] += time.monotonic() - t
    t = time.monotonic()
    params = training.export_params(sae, options)
    # Evaluate the weights as they are shipped (float16 rounding included).
    params = {
        k: v.astype(options.weights_dtype if v.ndim == 2 else np.float32).astype(np.float32)
        for k, v in params.items()
    }
    loss_ctx = eval_ctx[: options.loss_contexts]
    report = training.evaluate(params, options, eval_shards, model, loss_ctx, progress)
    timings["evaluate"] = time.monotonic() - t
    progress(report.describe())

    output = Path(options.output).expanduser()
    training_record = {
        "options": asdict(options),
        "model": resolved.name,
        "corpus": {
            "train": options.corpus,
            "eval": options.eval_corpus
            or f"{options.eval_fraction:.0%} of the documents of {options.corpus}",
            "train_tokens": train_tokens,
            "eval_tokens": len(eval_ctx) * (options.context - 1),
        },  # fmt: skip
        "library": "sparsify (SparseCoder, SignSGD + schedule-free)"
        if options.architecture == "topk"
        else "neuroscope JumpReLU",
        "steps": info["steps"],
        "trained_tokens": info["steps"] * min(options.batch_tokens, train_tokens),
        "history": info["history"][-20:],
        "eval": report.to_dict(),
        "seconds": timings,
    }
    write_output(output, params, saelens_cfg(options, int(params["b_dec"].shape[0]), resolved.name),
                 training_record, options.weights_dtype)  # fmt: skip
    progress(f"wrote {output} (load it with --sae-local-path {output})")
    return TrainResult(output, report, train_tokens, timings)
