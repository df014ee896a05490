"""The usual torch ways of watching SAE features, on the very weights Neuroscope's torch backend holds.

- ``hf-generate``: ``transformers`` ``generate``, greedy, no instrumentation: the torch ceiling.
- ``hf-hidden-states``: ``generate(output_hidden_states=True)``, then the SAE over the hidden states
  of every position afterwards (features arrive only when the whole reply is done).
- ``hf-forward-loop``: a hand-written KV-cache loop calling the model with
  ``output_hidden_states=True`` and encoding each new position as it comes (streams, like
  Neuroscope).
- ``tl-saelens``: the TransformerLens + SAELens loop of live visualisers: ``HookedTransformer`` (built
  from a config, loaded with the same weights), one full ``run_with_cache`` forward pass per token
  over the whole sequence (no KV cache), a SAELens ``JumpReLUSAE`` on ``blocks.L.hook_resid_post``.

The ``transformers`` contenders share the backend's model object (no second copy in memory; its
Neuroscope hook is switched off and returns at once). The TransformerLens model takes the weights
over from it, so it runs last, after the model has been released.
"""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from benchmarks.common import Contender, PeerRun, steps
from neuroscope.bench import set_instrumented
from neuroscope.sae import SAE
from neuroscope_torch.backend import cache_keyword


def saelens_sae(sae: SAE) -> Any:
    """The same JumpReLU parameters as a SAELens ``JumpReLUSAE`` (float32, CPU)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    if sae.architecture != "jumprelu" or sae.input_norm != "none":
        raise ValueError(f"The peers need a plain JumpReLU SAE; got {sae.architecture}.")
    cfg = JumpReLUSAEConfig(
        d_in=sae.d_model,
        d_sae=sae.width,
        dtype="float32",
        device="cpu",
        apply_b_dec_to_input=sae.apply_b_dec_to_input,
        normalize_activations="none",
    )
    out = JumpReLUSAE(cfg)
    arrays = {
        "W_enc": sae.W_enc,
        "W_dec": sae.W_dec,
        "b_enc": sae.b_enc,
        "b_dec": sae.b_dec,
        "threshold": sae.threshold,
    }
    out.load_state_dict(
        {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    )
    return out.eval()


def _top_k_to_host(features: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    values, indices = features.topk(k, dim=-1)
    return indices.cpu().numpy(), values.cpu().numpy()


class _Clock:
    """A ``generate`` streamer that only notes when each token arrives (the first call is the
    prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _generate_kwargs(model: Any, tokens: int, **extra: Any) -> dict[str, Any]:
    """Greedy, exactly ``tokens`` new tokens.

    Passed as ``generate`` keyword arguments, not as a ``GenerationConfig``: in a config,
    ``eos_token_id=None`` counts as unset and the model's own EOS comes back, ending a reply early.
    """
    pad = model.config.pad_token_id
    return {
        "max_new_tokens": tokens,
        "do_sample": False,
        "eos_token_id": None,
        "pad_token_id": pad if pad is not None else 0,
        **extra,
    }


def transformers_contenders(
    session: Any, prompt_ids: Sequence[int], sae: Any, layer: int, top_k: int
) -> list[Contender]:
    """``generate`` plain, ``generate`` + hidden states, and a forward loop + hidden states."""
    from transformers import DynamicCache

    model = session.backend.model
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], device=device)
    mask = torch.ones_like(ids)
    n_prompt = ids.shape[1]

    def prepare() -> None:
        set_instrumented(session, False)  # Neuroscope's hook stays registered but does nothing

    def generate_plain(tokens: int) -> PeerRun:
        prepare()
        clock = _Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=mask, streamer=clock, **_generate_kwargs(model, tokens)
            )
        end = time.perf_counter()
        return PeerRun(
            tokens=tuple(out[0, n_prompt:].tolist()),
            ttft_s=clock.times[1] - start,
            total_s=end - start,
            step_s=steps(clock.times[1:]),  # times[0]: generate hands the streamer the prompt
            feature_positions=0,
        )

    def generate_hidden_states(tokens: int) -> PeerRun:
        prepare()
        clock = _Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=mask, streamer=clock,
                **_generate_kwargs(
                    model, tokens, output_hidden_states=True, return_dict_in_generate=True
                ),
            )  # fmt: skip
            # One entry per step, each (embeddings, block 0, ..., block n-1) over that step's
            # positions: block L's output is index L + 1.
            residual = torch.cat([step[layer + 1][0] for step in out.hidden_states])
            indices, _ = _top_k_to_host(sae.encode(residual), top_k)
        end = time.perf_counter()
        return PeerRun(
            tokens=tuple(out.sequences[0, n_prompt:].tolist()),
            ttft_s=clock.times[1] - start,
            total_s=end - start,  # the SAE pass at the end counts here, not in the steps
            step_s=steps(clock.times[1:]),
            feature_positions=len(indices),
        )

    def forward_loop(tokens: int) -> PeerRun:
        prepare()
        start = time.perf_counter()
        marks: list[float] = []
        generated: list[int] = []
        positions = 0
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            step_ids = ids
            for _ in range(tokens):
                out = model(
                    input_ids=step_ids, use_cache=True, output_hidden_states=True,
                    **{cache_keyword(model): cache},
                )  # fmt: skip
                indices, _ = _top_k_to_host(sae.encode(out.hidden_states[layer + 1][0]), top_k)
                positions += len(indices)
                token = int(out.logits[0, -1].argmax())
                generated.append(token)
                marks.append(time.perf_counter())
                step_ids = torch.tensor([[token]], device=device)
        return PeerRun(
            tokens=tuple(generated),
            ttft_s=marks[0] - start,
            total_s=marks[-1] - start,
            step_s=steps(marks),
            feature_positions=positions,
        )

    return [
        Contender("hf-generate", "transformers generate, no SAE (torch ceiling)", generate_plain),
        Contender(
            "hf-hidden-states",
            "transformers generate(output_hidden_states) + SAELens SAE afterwards",
            generate_hidden_states,
        ),
        Contender(
            "hf-forward-loop",
            "transformers forward loop (KV cache, output_hidden_states) + SAELens SAE per step",
            forward_loop,
        ),
    ]


# -- TransformerLens --------------------------------------------------------------------------------


def hooked_transformer_config(config: Any) -> dict[str, Any]:
    """TransformerLens config fields for a transformers Gemma 2 or Llama config (the same model)."""
    common = {
        "d_model": config.hidden_size,
        "d_head": getattr(config, "head_dim", None)
        or config.hidden_size // config.num_attention_heads,
        "n_heads": config.num_attention_heads,
        "n_key_value_heads": config.num_key_value_heads,
        "d_mlp": config.intermediate_size,
        "n_layers": config.num_hidden_layers,
        "n_ctx": config.max_position_embeddings,
        "eps": config.rms_norm_eps,
        "d_vocab": config.vocab_size,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_base": _rope_theta(config),
        "gated_mlp": True,
        "final_rms": True,
        "dtype": torch.float32,
        "device": "cpu",
        "init_weights": False,  # the weights come from the transformers model
    }
    common["rotary_dim"] = common["d_head"]
    if config.model_type == "gemma2":
        return common | {
            "original_architecture": "Gemma2ForCausalLM",
            "act_fn": config.hidden_activation,
            "use_attn_scale": True,
            "attn_scale": config.query_pre_attn_scalar**0.5,
            "window_size": config.sliding_window,
            "use_local_attn": True,
            "attn_types": [
                "local" if t == "sliding_attention" else "global" for t in config.layer_types
            ],
            "attn_scores_soft_cap": config.attn_logit_softcapping,
            "output_logits_soft_cap": config.final_logit_softcapping,
            "use_normalization_before_and_after": True,
        }
    if config.model_type == "llama":
        return common | {
            "original_architecture": "LlamaForCausalLM",
            "act_fn": config.hidden_act,
            "rotary_adjacent_pairs": False,
        }
    raise ValueError(f"No TransformerLens mapping here for {config.model_type!r} (gemma2, llama).")


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0))


def take_over_as_hooked_transformer(model: Any) -> Any:
    """A ``HookedTransformer`` holding ``model``'s weights; ``model`` is emptied on the way.

    The weights are copied tensor by tensor into TransformerLens' own layout and each source tensor
    is released once copied, so the two models never both sit in memory in full (at gemma-2-2b
    shapes that is 10 GB each). The caller must hold no other reference to ``model``.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    config = model.config.get_text_config()
    cfg = HookedTransformerConfig(**hooked_transformer_config(config))
    convert = convert_gemma_weights if config.model_type == "gemma2" else convert_llama_weights
    with torch.inference_mode():
        state = convert(model, cfg)
    # Drop the transformers modules; the converted entries (views, mostly) keep what they need.
    for name, _ in list(model.named_children()):
        delattr(model, name)
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HookedTransformer's deprecation notice
        tl = HookedTransformer(cfg, move_to_device=False)
    params = dict(tl.named_parameters())
    missing = set(params) - set(state)
    if missing:
        raise RuntimeError(f"TransformerLens parameters with no source weight: {sorted(missing)}")
    with torch.no_grad():
        for name in list(state):
            params[name].copy_(state.pop(name))
    gc.collect()
    return tl.eval()


def tl_contender(tl: Any, prompt_ids: Sequence[int], sae: Any, layer: int, top_k: int) -> Contender:
    hook = f"blocks.{layer}.hook_resid_post"
    prompt = torch.tensor([list(prompt_ids)])

    def run(tokens: int) -> PeerRun:
        start = time.perf_counter()
        marks: list[float] = []
        sequence = prompt
        positions = 0
        generated: list[int] = []
        with torch.inference_mode():
            for step in range(tokens):
                logits, cache = tl.run_with_cache(sequence, names_filter=hook)
                # The prompt's features on the first pass, then the newest position's.
                residual = cache[hook][0] if step == 0 else cache[hook][0, -1:]
                indices, _ = _top_k_to_host(sae.encode(residual), top_k)
                positions += len(indices)
                token = int(logits[0, -1].argmax())
                generated.append(token)
                marks.append(time.perf_counter())
                sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
        return PeerRun(
            tokens=tuple(generated),
            ttft_s=marks[0] - start,
            total_s=marks[-1] - start,
            step_s=steps(marks),
            feature_positions=positions,
        )

    return Contender(
        "tl-saelens",
        "TransformerLens run_with_cache per token (no KV cache) + SAELens JumpReLU",
        run,
        phase=1,  # after the transformers model is gone: not in Neuroscope's rounds
    )


def last_logits(model: Any, prompt_ids: Sequence[int]) -> np.ndarray:
    """The transformers model's logits at the last prompt position (to check the TL copy against)."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([list(prompt_ids)]), logits_to_keep=1)
    return out.logits[0, -1].float().numpy()


def tl_last_logits(tl: Any, prompt_ids: Sequence[int]) -> np.ndarray:
    with torch.inference_mode():
        return tl(torch.tensor([list(prompt_ids)]))[0, -1].float().numpy()
