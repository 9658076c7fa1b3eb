"""The LM head over gathered hidden states: chunked token log-probs, summed per sequence.

Besides the plain sums it gives, on request, LD-DPO's length-desensitised sums (shared length + ld_alpha
x the rest) and WPO's per-token ``log sum_v p_v^2`` (one more reduction per chunk), still without
keeping any ``(B, T, V)`` logits.

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


def _chunk_token_stats(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    # also log sum_v p_v^2 = logsumexp(2 log p) (WPO, Eq. 2), without gradient; after the gather, so that
    # the checkpoint's recomputation in the backward stops before it (early stop)
    logp = torch.log_softmax(head(hidden).float(), dim=-1)
    picked = logp.gather(-1, targets[:, None]).squeeze(-1)
    with torch.no_grad():
        log_sum_sq = torch.logsumexp(2.0 * logp, dim=-1)
    return picked, log_sum_sq


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
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, with_log_sum_sq: bool = False):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        log_sum_sq = torch.empty(hidden.shape[0] if with_log_sum_sq else 0, dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
            logp = torch.log_softmax(torch.nn.functional.linear(h, weight, bias).float(), dim=-1)
            out[start:start + chunk_size] = logp.gather(-1, t[:, None]).squeeze(-1)
            if with_log_sum_sq:
                log_sum_sq[start:start + chunk_size] = torch.logsumexp(2.0 * logp, dim=-1)
            p = logp.exp_()
            p[torch.arange(p.shape[0], device=p.device), t] -= 1.0  # softmax − onehot = −d logp_t / d logits
            grad[start:start + chunk_size] = torch.matmul(p.to(weight.dtype), weight).neg_()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(log_sum_sq)
        return out, log_sum_sq

    @staticmethod
    def backward(ctx, grad_out, grad_log_sum_sq):
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None].to(grad.dtype), None, None, None, None, None


def token_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: Optional[int] = None,
                *, fused: bool = False) -> torch.Tensor:
    """Log-probabilities ``log softmax(head(hidden))[target]`` of ``M`` tokens, ``(M,)`` float32.

    ``hidden``: ``(M, H)``; ``targets``: ``(M,)`` int64. Computed ``chunk_size`` rows at a time
    (None: :func:`auto_chunk_size` of the head's vocabulary); with grad enabled each chunk is
    checkpointed (logits recomputed in the backward). ``fused`` (``--fused_lm_head``): where
    :func:`fused_head_applies`, the gradient w.r.t. ``hidden`` is computed in the forward instead
    (:class:`_FusedHeadLogps`), one ``(chunk, V)`` matmul and log-softmax less per chunk.
    """
    return head_token_logps(head, hidden, targets, chunk_size, fused=fused)[0]


def head_token_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: Optional[int] = None,
                     *, fused: bool = False, log_sum_sq: bool = False
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`token_logps` ``(M,)`` and, with ``log_sum_sq``, ``log sum_v p_v^2`` of each of the ``M``
    next-token distributions ``(M,)`` float32 without gradient (WPO's alignment term, Zhou et al. 2024,
    arXiv 2406.11827, Eq. 2; TRL 1.16's ``log_sum_sq_probs``): ``logsumexp(2 log p)`` over the
    vocabulary, one more reduction of each ``(chunk, V)`` block; else None."""
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty.clone() if log_sum_sq else None)
    if chunk_size is None:
        chunk_size = auto_chunk_size(getattr(head, "out_features", None) or head.weight.shape[0])
    if fused and fused_head_applies(head, hidden):
        out, lss = _FusedHeadLogps.apply(hidden, head.weight, head.bias, targets, chunk_size, log_sum_sq)
        return out, (lss if log_sum_sq else None)
    use_ckpt = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    fn = _chunk_token_stats if log_sum_sq else _chunk_token_logps
    out, lss = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        part = checkpoint(fn, head, h, t, use_reentrant=False) if use_ckpt else fn(head, h, t)
        if log_sum_sq:
            out.append(part[0])
            lss.append(part[1])
        else:
            out.append(part)
    return torch.cat(out), (torch.cat(lss).detach() if log_sum_sq else None)


def positions_in_sequence(target_seq: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """``(M,)`` int64: the 0-based position of each target inside its sequence's completion, from
    ``target_seq`` ``(M,)`` (every layout lists a sequence's targets in completion order)."""
    order = torch.argsort(target_seq, stable=True)
    counts = torch.bincount(target_seq, minlength=num_sequences)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(target_seq)
    pos[order] = torch.arange(target_seq.shape[0], device=target_seq.device) - starts[target_seq[order]]
    return pos


def per_sequence_logps(logps: torch.Tensor, batch: dict[str, torch.Tensor],
                       extra_losses: Optional[dict[str, torch.Tensor]] = None,
                       extra_loss_weights: Optional[dict[str, float]] = None, *,
                       ld_alpha: Optional[float] = None, log_sum_sq: Optional[torch.Tensor] = None) -> PolicyLogps:
    """Token log-probs ``(M,)`` of a laid-out ``batch`` summed per sequence: :class:`PolicyLogps` with
    ``(B,)`` sums (nats) and token counts, plus the batch's precomputed reference log-probs when present
    and the kind's extra loss terms and their weights.

    ``ld_alpha`` (LD-DPO, Liu et al. 2024, arXiv 2409.06411, Eq. 8, as TRL 1.16 computes it): the
    sums are ``shared + ld_alpha * tail``, ``shared`` over the first ``min(len_chosen, len_rejected)``
    completion tokens of each sequence of a pair and ``tail`` over the rest; ``chosen_plain_logps``
    keeps the plain chosen sums. ``log_sum_sq`` ``(M,)`` (from :func:`head_token_logps`): WPO's
    ``chosen_aligned_logps`` / ``rejected_aligned_logps``, the sums of ``log p_t - log sum_v p_v^2``
    without gradient.
    """
    num_pairs = int(batch["num_pairs"])
    seq = batch["target_seq"]
    zeros = torch.zeros(2 * num_pairs, dtype=logps.dtype, device=logps.device)
    sums = zeros.index_add(0, seq, logps)
    counts = torch.bincount(seq, minlength=2 * num_pairs).to(logps.dtype)
    scored, plain = sums, None
    if ld_alpha is not None:
        cut = torch.minimum(counts[:num_pairs], counts[num_pairs:]).repeat(2)
        tail = (positions_in_sequence(seq, 2 * num_pairs) >= cut[seq]).to(logps.dtype)
        shared_sums = zeros.index_add(0, seq, logps * (1.0 - tail))
        tail_sums = zeros.index_add(0, seq, logps * tail)
        scored, plain = shared_sums + ld_alpha * tail_sums, sums[:num_pairs]
    aligned = None
    if log_sum_sq is not None:
        aligned = zeros.index_add(0, seq, logps.detach() - log_sum_sq.to(logps.dtype))
    ref_c = batch.get("ref_chosen_logps")
    ref_r = batch.get("ref_rejected_logps")
    return PolicyLogps(
        chosen_logps=scored[:num_pairs],
        rejected_logps=scored[num_pairs:],
        chosen_lengths=counts[:num_pairs],
        rejected_lengths=counts[num_pairs:],
        ref_chosen_logps=None if ref_c is None else ref_c.to(logps.dtype),
        ref_rejected_logps=None if ref_r is None else ref_r.to(logps.dtype),
        extra_losses=dict(extra_losses or {}),
        extra_loss_weights=dict(extra_loss_weights or {}),
        ld_alpha=ld_alpha,
        chosen_plain_logps=plain,
        chosen_aligned_logps=None if aligned is None else aligned[:num_pairs],
        rejected_aligned_logps=None if aligned is None else aligned[num_pairs:],
    )
