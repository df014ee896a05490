"""Training an SAE on one layer's residual stream with torch: the work behind ``neuroscope sae train``.

Three resumable stages, each writing atomically into a work folder (see ``neuroscope.sae_train``):

1. harvest: run the model up to block L on packed contexts and store the residual (output of block
   L, position 0 left out) as float16 shards; a shard that exists is never recomputed;
2. train: TopK SAEs are EleutherAI ``sparsify``'s ``SparseCoder`` (its fused encoder, unit-norm
   decoder, AuxK loss for dead latents) stepped by its default optimiser (sign-SGD under
   schedule-free); JumpReLU is a small model here (sparsify has none). The loop is ours because
   sparsify's ``Trainer`` runs the whole model for every batch and reads each token once, while on a
   CPU we run the model once, up to block L, and take several epochs over the stored activations;
3. evaluate on held-out activations: FVU, mean L0, dead latents, and the next-token loss with the
   SAE's reconstruction in place of the residual.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neuroscope.cache import atomic_path
from neuroscope.errors import ConfigError
from neuroscope.sae_train import EvalReport, TrainOptions
from neuroscope_torch.backend import _decoder_layers

Progress = Callable[[str], None]


class _StopForward(Exception):
    """Raised by the hook after block L: the blocks above it need not run to harvest."""


# -- harvest ---------------------------------------------------------------------------------------


def load_model(model_dir: Path, device: str = "cpu") -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.to(device).eval().requires_grad_(False)


def _blocks(model: Any) -> nn.ModuleList:
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    return _decoder_layers(model, config.num_hidden_layers)


@torch.inference_mode()
def residuals(model: Any, layer: int, contexts: np.ndarray) -> torch.Tensor:
    """The output of block ``layer`` for a batch of contexts [B, T] -> [B, T, d] (float32)."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = _blocks(model)[layer].register_forward_hook(hook)
    try:
        ids = torch.as_tensor(contexts, dtype=torch.long, device=model.device)
        model(input_ids=ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0].float()


def harvest(
    model: Any,
    layer: int,
    contexts: np.ndarray,
    folder: Path,
    prefix: str,
    shard_contexts: int,
    batch_contexts: int,
    progress: Progress,
) -> list[Path]:
    """Store the residuals (position 0 dropped) of ``contexts`` as float16 shards in ``folder``."""
    n = len(contexts)
    count = math.ceil(n / shard_contexts)
    shards = [folder / f"{prefix}_{i:05d}.npy" for i in range(count)]
    start_time, done_tokens = time.monotonic(), 0
    for i, path in enumerate(shards):
        if path.is_file() or not _claim(path):
            continue
        part = contexts[i * shard_contexts : (i + 1) * shard_contexts]
        out = [
            residuals(model, layer, part[j : j + batch_contexts])[:, 1:].reshape(
                -1, model.config.hidden_size
            )
            for j in range(0, len(part), batch_contexts)
        ]
        acts = torch.cat(out).to(torch.float16).numpy()
        if not np.isfinite(acts).all():
            raise ConfigError(
                f"Block {layer}'s residual overflows float16 in shard {i}; train on a smaller model "
                "or an earlier layer."
            )
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, acts)
        _claim_file(path).unlink(missing_ok=True)
        done_tokens += acts.shape[0]
        rate = done_tokens / max(time.monotonic() - start_time, 1e-9)
        progress(f"harvest {prefix}: shard {i + 1}/{count}, {rate:,.0f} tokens/s")
    while not all(p.is_file() for p in shards):  # shards another process claimed
        for p in shards:
            if not p.is_file() and _claim(p):
                raise ConfigError(
                    f"The process harvesting {p.name} stopped; run the command again."
                )
        time.sleep(2)
    return shards


def _claim_file(path: Path) -> Path:
    return path.with_name(path.name + ".claim")


def _claim(path: Path) -> bool:
    """Claim a shard, so that several processes running the same command split the harvest; a
    claim whose process is gone is taken over."""
    claim = _claim_file(path)
    for _ in range(2):
        try:
            with open(claim, "x") as f:
                f.write(str(os.getpid()))
            return True
        except FileExistsError:
            try:
                pid = int(claim.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid == os.getpid():
                return True
            if pid and _alive(pid):
                return False
            claim.unlink(missing_ok=True)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_shards(paths: list[Path], limit: int | None = None) -> torch.Tensor:
    arrays, total = [], 0
    for p in paths:
        a = np.load(p)
        arrays.append(a)
        total += len(a)
        if limit is not None and total >= limit:
            break
    acts = torch.from_numpy(np.concatenate(arrays))
    return acts[:limit] if limit is not None else acts


# -- the SAEs --------------------------------------------------------------------------------------


class JumpReLUSAE(nn.Module):
    """JumpReLU (Rajamanoharan et al. 2024): f = pre * (pre > theta), trained with straight-through
    pseudo-derivatives (rectangle kernel of width ``bandwidth``) and an L0 penalty whose weight is
    steered toward the target L0."""

    def __init__(self, d_in: int, width: int, bandwidth: float = 0.05):
        super().__init__()
        w = torch.randn(width, d_in) / math.sqrt(d_in)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.clone())  # [width, d]
        self.W_enc = nn.Parameter(w.T.contiguous())  # [d, width]
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.log_threshold = nn.Parameter(torch.full((width,), math.log(0.1)))
        self.bandwidth = bandwidth

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre = self.encode_pre(x)
        theta = self.log_threshold.exp()
        acts = pre * _Step.apply(pre, theta, self.bandwidth)
        recon = acts @ self.W_dec + self.b_dec
        l0 = _Step.apply(pre, theta, self.bandwidth).sum(-1).mean()
        return recon, acts, l0


class _Step(torch.autograd.Function):
    """Heaviside step H(pre - theta) with the paper's pseudo-derivative with respect to theta."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = ((pre - theta).abs() < eps / 2).to(pre.dtype) / eps
        return None, (-grad * kernel).sum(0), None


def _new_sae(options: TrainOptions, d_in: int) -> Any:
    torch.manual_seed(options.seed)
    if options.architecture == "topk":
        from sparsify import SparseCoder, SparseCoderConfig  # type: ignore[import-untyped]

        cfg = SparseCoderConfig(num_latents=options.width, k=options.k)
        return SparseCoder(d_in, cfg, "cpu", dtype=torch.float32)
    return JumpReLUSAE(d_in, options.width)


def _optimizer(options: TrainOptions, sae: Any) -> Any:
    # sparsify's defaults: sign-SGD with momentum under schedule-free, lr scaled by 1/sqrt(width).
    from schedulefree import ScheduleFreeWrapper  # type: ignore[import-untyped]
    from sparsify.sign_sgd import SignSGD  # type: ignore[import-untyped]

    lr = options.lr or 5e-3 / math.sqrt(options.width / 2**14)
    opt = ScheduleFreeWrapper(SignSGD(sae.parameters(), lr=lr), momentum=0.95)
    opt.train()
    return opt


def export_params(sae: Any, options: TrainOptions) -> dict[str, np.ndarray]:
    """SAELens parameter names: W_enc [d, width], W_dec [width, d], b_enc, b_dec (+ threshold)."""
    with torch.no_grad():
        if options.architecture == "topk":
            params = {
                "W_enc": sae.encoder.weight.T,
                "b_enc": sae.encoder.bias,
                "W_dec": sae.W_dec,
                "b_dec": sae.b_dec,
            }
        else:
            # SAELens' jumprelu takes the raw residual; fold the b_dec subtraction into b_enc.
            params = {
                "W_enc": sae.W_enc,
                "b_enc": sae.b_enc - sae.b_dec @ sae.W_enc,
                "W_dec": sae.W_dec,
                "b_dec": sae.b_dec,
                "threshold": sae.log_threshold.exp(),
            }
        return {k: v.detach().float().contiguous().numpy() for k, v in params.items()}


# -- train -----------------------------------------------------------------------------------------


def _batches(n: int, batch: int, epoch: int, seed: int) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    for i in range(0, n - batch + 1, batch):
        yield order[i : i + batch]


def train(
    options: TrainOptions,
    acts: torch.Tensor,
    checkpoint: Path,
    progress: Progress,
) -> tuple[Any, dict[str, Any]]:
    """Train on ``acts`` [N, d] (float16) for ``options.epochs``; resume from ``checkpoint``."""
    n, d_in = acts.shape
    batch = min(options.batch_tokens, n)
    steps_per_epoch = n // batch
    total_steps = max(1, round(options.epochs * steps_per_epoch))
    sae = _new_sae(options, d_in)
    opt = _optimizer(options, sae)
    step, since_fired = 0, torch.zeros(options.width, dtype=torch.long)
    l0_coef = 1e-3
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["optimizer"])
        step, since_fired, l0_coef = state["step"], state["since_fired"], state["l0_coef"]
        progress(f"resuming at step {step}/{total_steps} from {checkpoint}")
    elif options.architecture == "topk":
        with torch.no_grad():  # as sparsify: centre the pre-activations on the data's mean
            sae.b_dec.data = acts[: min(n, 65536)].float().mean(0)
    else:
        with torch.no_grad():
            sae.b_dec.data = acts[: min(n, 65536)].float().mean(0)

    def save() -> None:
        state = {"sae": sae.state_dict(), "optimizer": opt.state_dict(), "step": step,
                 "since_fired": since_fired, "l0_coef": l0_coef}  # fmt: skip
        with atomic_path(checkpoint) as tmp:
            torch.save(state, tmp)

    total_variance_scale = None
    t0, tokens_done, log = time.monotonic(), 0, {"fvu": 0.0, "l0": 0.0, "n": 0}
    history: list[dict[str, float]] = []
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        for i, index in enumerate(_batches(n, batch, epoch, options.seed)):
            if i < offset:
                continue
            x = acts[index].float()
            total_variance = (x - x.mean(0)).pow(2).sum()
            if options.architecture == "topk":
                sae.set_decoder_norm_to_unit_norm()
                dead = since_fired > options.dead_after_tokens
                out = sae(x, dead_mask=dead)
                loss = out.fvu + options.auxk_alpha * out.auxk_loss
                fvu, l0 = float(out.fvu.detach()), float(options.k)
                fired = out.latent_indices.flatten()
            else:
                recon, feats, l0_soft = sae(x)
                fvu_t = (recon - x).pow(2).sum() / total_variance
                loss = fvu_t + l0_coef * l0_soft
                fvu, l0 = float(fvu_t.detach()), float((feats > 0).sum(-1).float().mean())
                fired = (feats > 0).any(0).nonzero().flatten()
                # steer the L0 weight toward the target, multiplicatively and slowly
                l0_coef *= math.exp(0.01 * math.tanh(math.log(max(l0, 1e-3) / options.k)))
            loss.backward()
            if options.architecture == "topk":
                sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            if options.architecture == "jumprelu":
                with torch.no_grad():
                    sae.W_dec.data /= sae.W_dec.data.norm(dim=1, keepdim=True).clamp(min=1e-8)
            since_fired += batch
            since_fired[fired] = 0
            step += 1
            tokens_done += batch
            log["fvu"] += fvu
            log["l0"] += l0
            log["n"] += 1
            if step % options.log_every == 0 or step == total_steps:
                rate = tokens_done / max(time.monotonic() - t0, 1e-9)
                dead_frac = float((since_fired > options.dead_after_tokens).float().mean())
                row = {"step": step, "fvu": log["fvu"] / log["n"], "l0": log["l0"] / log["n"],
                       "dead": dead_frac, "tokens_per_s": rate}  # fmt: skip
                history.append(row)
                progress(
                    f"step {step}/{total_steps} (epoch {epoch + 1}): {rate:,.0f} tokens/s, "
                    f"loss (FVU) {row['fvu']:.4f}, L0 {row['l0']:.1f}, "
                    f"{dead_frac:.1%} not fired in {options.dead_after_tokens:,} tokens"
                )
                log = {"fvu": 0.0, "l0": 0.0, "n": 0}
            if step % options.save_every == 0:
                save()
            if step >= total_steps:
                break
    save()
    del total_variance_scale
    opt.eval()  # schedule-free: the averaged weights are the ones to keep
    return sae, {"steps": step, "history": history}


# -- evaluate --------------------------------------------------------------------------------------


def encode_numpy(
    params: dict[str, np.ndarray], options: TrainOptions, x: torch.Tensor
) -> torch.Tensor:
    """Encode as the exported SAELens folder says (what neuroscope's loaders do)."""
    W_enc, b_enc = torch.from_numpy(params["W_enc"]), torch.from_numpy(params["b_enc"])
    b_dec = torch.from_numpy(params["b_dec"])
    if options.architecture == "topk":
        pre = torch.relu((x - b_dec) @ W_enc + b_enc)
        values, indices = pre.topk(options.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, values)
    pre = x @ W_enc + b_enc
    return pre * (pre > torch.from_numpy(params["threshold"]))


def decode_numpy(params: dict[str, np.ndarray], feats: torch.Tensor) -> torch.Tensor:
    return feats @ torch.from_numpy(params["W_dec"]) + torch.from_numpy(params["b_dec"])


@torch.inference_mode()
def evaluate(
    params: dict[str, np.ndarray],
    options: TrainOptions,
    heldout: list[Path],
    model: Any,
    loss_contexts: np.ndarray,
    progress: Progress,
) -> EvalReport:
    """FVU, L0 and dead latents over every held-out token; loss change on ``loss_contexts``."""
    width = options.width
    fired = torch.zeros(width, dtype=torch.bool)
    sq_err = 0.0
    n_tokens, l0_sum = 0, 0.0
    s1 = torch.zeros(params["b_dec"].shape[0], dtype=torch.float64)
    s2 = 0.0
    for path in heldout:
        acts = torch.from_numpy(np.load(path))
        for i in range(0, len(acts), 8192):
            x = acts[i : i + 8192].float()
            feats = encode_numpy(params, options, x)
            recon = decode_numpy(params, feats)
            sq_err += float((recon - x).double().pow(2).sum())
            s1 += x.double().sum(0)
            s2 += float(x.double().pow(2).sum())
            active = feats > 0
            l0_sum += float(active.sum())
            fired |= active.any(0)
            n_tokens += len(x)
    total_var = s2 - float((s1 * s1).sum()) / n_tokens
    clean, spliced = _loss_change(params, options, model, loss_contexts, progress)
    return EvalReport(
        tokens=n_tokens,
        fvu=sq_err / total_var,
        mean_l0=l0_sum / n_tokens,
        dead_fraction=float((~fired).float().mean()),
        dead=int((~fired).sum()),
        loss_tokens=int(loss_contexts.shape[0] * (loss_contexts.shape[1] - 2)),
        clean_loss=clean,
        spliced_loss=spliced,
    )


def _loss_change(
    params: dict[str, np.ndarray],
    options: TrainOptions,
    model: Any,
    contexts: np.ndarray,
    progress: Progress,
) -> tuple[float, float]:
    """Mean next-token loss, clean and with block L's output replaced by the SAE's reconstruction
    (position 0 kept: the SAE never saw it). Predictions from position 0 are left out of both."""
    block = _blocks(model)[options.layer]

    def splice(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        x = hidden[:, 1:].float()
        recon = decode_numpy(params, encode_numpy(params, options, x)).to(hidden.dtype)
        hidden = torch.cat([hidden[:, :1], recon], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def mean_loss() -> float:
        total, count = 0.0, 0
        for j in range(0, len(contexts), 8):
            ids = torch.as_tensor(contexts[j : j + 8], dtype=torch.long)
            logits = model(input_ids=ids, use_cache=False).logits[:, 1:-1].float()
            target = ids[:, 2:]
            total += float(
                nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
            )
            count += target.numel()
        return total / count

    clean = mean_loss()
    handle = block.register_forward_hook(splice)
    try:
        spliced = mean_loss()
    finally:
        handle.remove()
    progress(f"next-token loss: clean {clean:.4f}, with the SAE {spliced:.4f}")
    return clean, spliced
