"""The LM head over gathered hidden states: chunked token log-probs, summed per sequence.

Only the hidden states that predict a scored completion token reach the head (``(M, H)``, gathered
by the model's kind, :mod:`preftune.engine.kinds`); the LM head + log-softmax run over them in
chunks of ``chunk_size`` rows. In training each chunk is wrapped in activation checkpointing, so
the forward keeps no logits and the backward recomputes one ``(chunk, V)`` block at a time: peak
memory holds one block instead of ``(B, T, V)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from preftune.errors import UnsupportedModelError
from preftune.modeling import unwrap_peft
from preftune.types import PolicyLogps


def get_decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split a causal LM into ``(decoder, lm_head)`` so log-probs can be computed from hidden states.

    ``decoder(input_ids=..., attention_mask=...)`` returns an output whose ``last_hidden_state``
    ``[B, T, H]`` is the final (normed) hidden state, and ``lm_head(h)`` maps ``[..., H]`` to logits
    ``[..., V]``; together they equal ``model(...).logits`` (``lm_head`` may be LoRA-wrapped and/or
    tied to the input embeddings; it is the very module the model calls).

    Raises:
        UnsupportedModelError: the model has no decoder/output embedding, or post-processes its
            logits (soft-capping or scaling), which the split would silently drop.
    """
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(text_config, attr, None)
        if value not in (None, 1, 1.0):
            raise UnsupportedModelError(
                f"{type(base).__name__} (model_type {getattr(config, 'model_type', '?')!r}) applies "
                f"config.{attr}={value} to its logits; preftune's chunked LM head does not support such models")
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if head is None or decoder is None or decoder is base:
        raise UnsupportedModelError(
            f"{type(base).__name__} (model_type {getattr(config, 'model_type', '?')!r}) is not a causal LM "
            "with a separate decoder and lm_head")
    return decoder, head


def _chunk_token_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # log_softmax + gather rather than gather - logsumexp: the same values, faster on CPU for
    # vocabulary-wide blocks (docs/performance.md)
    logits = head(hidden).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


LOGITS_PER_CHUNK = 2 ** 25  # 128 MiB of float32 logits per block


def auto_chunk_size(vocab_size: int) -> int:
    """Rows per LM-head chunk so that one ``(rows, V)`` float32 block holds about 2^25 logits
    (128 MiB): the block's memory no longer grows with the vocabulary. At least 16 rows."""
    return max(16, LOGITS_PER_CHUNK // max(1, int(vocab_size)))


def fused_head_applies(head: nn.Module, hidden: torch.Tensor) -> bool:
    """The fused path needs a plain linear head whose parameters are frozen (LoRA: the output
    head and tied embeddings are not adapted) and a hidden state that needs a gradient."""
    return (torch.is_grad_enabled() and hidden.requires_grad and type(head) is nn.Linear
            and not any(p.requires_grad for p in head.parameters()))


class _FusedHeadLogps(torch.autograd.Function):
    """``log softmax(h Wᵀ + b)[t]`` per row with ``d/dh`` computed in the forward, chunk by chunk.

    ``d log p_t / d logits = onehot(t) − softmax(logits)``, so ``d/dh = (onehot − p) W`` is known
    before the loss is (the loss only scales each row's gradient: ``grad_h = g_i · (onehot − p_i) W``).
    The forward keeps ``(M, H)`` row gradients instead of the hidden rows, and the backward
    recomputes no ``(chunk, V)`` logits block.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
            logp = torch.log_softmax(torch.nn.functional.linear(h, weight, bias).float(), dim=-1)
            out[start:start + chunk_size] = logp.gather(-1, t[:, None]).squeeze(-1)
            p = logp.exp_()
            p[torch.arange(p.shape[0], device=p.device), t] -= 1.0  # softmax − onehot = −d logp_t / d logits
            grad[start:start + chunk_size] = torch.matmul(p.to(weight.dtype), weight).neg_()
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None].to(grad.dtype), None, None, None, None


def token_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: Optional[int] = None,
                *, fused: bool = False) -> torch.Tensor:
    """Log-probabilities ``log softmax(head(hidden))[target]`` of ``M`` tokens, ``(M,)`` float32.

    ``hidden``: ``(M, H)``; ``targets``: ``(M,)`` int64. Computed ``chunk_size`` rows at a time
    (None: :func:`auto_chunk_size` of the head's vocabulary); with grad enabled each chunk is
    checkpointed (logits recomputed in the backward). ``fused`` (``--fused_lm_head``): where
    :func:`fused_head_applies`, the gradient w.r.t. ``hidden`` is computed in the forward instead
    (:class:`_FusedHeadLogps`), one ``(chunk, V)`` matmul and log-softmax less per chunk.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    if chunk_size is None:
        chunk_size = auto_chunk_size(getattr(head, "out_features", None) or head.weight.shape[0])
    if fused and fused_head_applies(head, hidden):
        return _FusedHeadLogps.apply(hidden, head.weight, head.bias, targets, chunk_size)
    use_ckpt = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if use_ckpt:
            out.append(checkpoint(_chunk_token_logps, head, h, t, use_reentrant=False))
        else:
            out.append(_chunk_token_logps(head, h, t))
    return torch.cat(out)


def per_sequence_logps(logps: torch.Tensor, batch: dict[str, torch.Tensor],
                       extra_losses: Optional[dict[str, torch.Tensor]] = None,
                       extra_loss_weights: Optional[dict[str, float]] = None) -> PolicyLogps:
    """Token log-probs ``(M,)`` of a laid-out ``batch`` summed per sequence: :class:`PolicyLogps` with
    ``(B,)`` sums (nats) and token counts, plus the batch's precomputed reference log-probs when present
    and the kind's extra loss terms and their weights."""
    num_pairs = int(batch["num_pairs"])
    sums = torch.zeros(2 * num_pairs, dtype=logps.dtype, device=logps.device).index_add(0, batch["target_seq"], logps)
    counts = torch.bincount(batch["target_seq"], minlength=2 * num_pairs).to(logps.dtype)
    ref_c = batch.get("ref_chosen_logps")
    ref_r = batch.get("ref_rejected_logps")
    return PolicyLogps(
        chosen_logps=sums[:num_pairs],
        rejected_logps=sums[num_pairs:],
        chosen_lengths=counts[:num_pairs],
        rejected_lengths=counts[num_pairs:],
        ref_chosen_logps=None if ref_c is None else ref_c.to(logps.dtype),
        ref_rejected_logps=None if ref_r is None else ref_r.to(logps.dtype),
        extra_losses=dict(extra_losses or {}),
        extra_loss_weights=dict(extra_loss_weights or {}),
    )
