"""Small typed records shared by the data pipeline, the engine, the losses and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class PairImages:
    """The images of one pair's prompt (vision–language models), loaded when a batch is laid out.

    Pixels are not kept in memory between steps: ``loader(prompt_text, paths)`` (a
    :class:`preftune.data.vision.ImageLoader`) runs the model's processor on the rendered prompt and
    returns its image tensors (``pixel_values``, ``image_grid_thw``, ``image_sizes``,
    ``pixel_attention_mask`` ... with one leading row per image or patch) and the expanded
    ``input_ids`` ``(1, P)``, which must equal the pair's ``prompt_ids``. ``image_token_id`` is the
    placeholder id the processor expanded each image into (one token per image feature row).
    ``digest``: sha1 (hex) of the image files' bytes, part of the reference-cache key.
    ``rejected_paths`` / ``rejected_prompt_ids``: other images for the rejected side (ms-swift's
    ``rejected_images``); such a pair's rejected sequence gets its own prompt (no shared prompt).
    """

    paths: list[str]
    prompt_text: str
    image_token_id: int
    loader: Any
    digest: str
    rejected_paths: Optional[list[str]] = None
    rejected_prompt_ids: Optional[list[int]] = None

    def load(self, rejected: bool = False) -> dict[str, torch.Tensor]:
        """Processor outputs for the prompt with its images (the rejected side's images when ``rejected``)."""
        return self.loader(self.prompt_text, self.rejected_paths if rejected else self.paths)


@dataclass
class TokenizedPair:
    """One preference pair after tokenisation.

    ``prompt_ids`` is the shared context; ``chosen_ids`` / ``rejected_ids`` are exactly the
    completion tokens the model is scored on (EOS appended once). Lists of token ids.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    # Optional cached reference log-probs (summed over completion tokens), filled by
    # preftune.engine.reference when --precompute_ref_log_probs is on.
    ref_chosen_logps: Optional[float] = None
    ref_rejected_logps: Optional[float] = None
    # Optional per-pair reward margin m of the reward-model loss (--loss rm: -log sigmoid(r_c - r_r - m),
    # Llama 2, arXiv 2307.09288, Sec. 3.2.2); the data's ``margin`` field. Other losses ignore it.
    margin: Optional[float] = None
    # Images of the prompt (vision–language models): the prompt_ids hold one placeholder token per
    # image feature row; see PairImages. None for text pairs.
    images: Optional[PairImages] = None
    # Where the pair came from, for messages (e.g. the non-finite guard's): ``location`` names the
    # source record ("data.jsonl, line 7"); ``record_index`` is the pair's position in the dataset
    # the trainer was given (set by preftune.trainer.PairDataset), carried by the batch.
    location: Optional[str] = None
    record_index: Optional[int] = None
    # KTO (unpaired data, preftune.data.unpaired): True for a desirable completion, False for an undesirable
    # one; ``chosen_ids`` is then the completion and ``rejected_ids`` its KL partner. None for a pair.
    label: Optional[bool] = None

    @property
    def num_tokens_logical(self) -> int:
        """Tokens of (prompt + chosen) + (prompt + rejected): what a padded-free two-sequence layout runs."""
        p = len(self.prompt_ids)
        return 2 * p + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def num_tokens_unique(self) -> int:
        """Tokens of prompt once + chosen + rejected: what the shared-prompt layout runs."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class PolicyLogps:
    """Per-sequence log-probabilities of a batch of B pairs, the input of every loss.

    All tensors have shape ``(B,)``. ``*_logps`` are sums of per-token log-probs (nats) over the
    completion tokens; ``*_lengths`` are the completion token counts (float). ``ref_*`` are the
    same sums under the reference policy (DPO family only).
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    ref_chosen_logps: Optional[torch.Tensor] = None
    ref_rejected_logps: Optional[torch.Tensor] = None
    # Extra loss terms the model computed on the way (unweighted scalars): ``{"aux_loss": ...}``
    # (mixture-of-experts router load balancing); the trainer adds ``weight * term`` to every loss,
    # with the weight of each term in ``extra_loss_weights`` (filled by the model's kind; a term
    # without an entry weighs 0).
    extra_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    extra_loss_weights: dict[str, float] = field(default_factory=dict)
    # KTO: ``(B,)`` bool, True where the example's completion (``chosen_*``) is desirable; ``rejected_*``
    # then score the KL partner (see preftune.data.unpaired). None for pairs.
    labels: Optional[torch.Tensor] = None
    # LD-DPO (``--ld_alpha``, set on the model by preftune.engine.forward.configure_sequence_outputs): the
    # ``*_logps`` sums (policy and reference alike) are then shared + ld_alpha * tail (the first
    # min(len_chosen, len_rejected) tokens of a pair weigh 1, the rest ld_alpha); ``ld_alpha`` records it and
    # ``chosen_plain_logps`` ``(B,)`` keeps the plain sums of the chosen completions (the NLL / sft term's).
    ld_alpha: Optional[float] = None
    chosen_plain_logps: Optional[torch.Tensor] = None
    # WPO (``--use_weighting``): ``(B,)`` sums over the completion tokens of log p_t - log sum_v p_v^2 (no
    # gradient), from which the loss weighs each pair (preftune.losses.dpo). None when not asked for.
    chosen_aligned_logps: Optional[torch.Tensor] = None
    rejected_aligned_logps: Optional[torch.Tensor] = None


@dataclass
class PairRewards:
    """Scalar rewards of a batch of B pairs from a reward model (value head), the input of ``--loss rm``.

    ``chosen_rewards`` / ``rejected_rewards``: ``(B,)`` head values at the last (non-pad) token of
    ``prompt + chosen`` and ``prompt + rejected`` (unitless scores, float32). ``margin``: ``(B,)``
    per-pair margin the chosen reward should exceed the rejected one by, or None (no margin, i.e. 0).
    ``extra_losses`` / ``extra_loss_weights`` as in :class:`PolicyLogps`.
    """

    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margin: Optional[torch.Tensor] = None
    extra_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    extra_loss_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class LossOutput:
    """What a loss returns.

    ``losses``: per-example loss ``(B,)`` whose mean is the batch loss (the NLL / BC term, a
    token-mean over the batch as in TRL, is spread over the examples so that the mean is exact).
    ``chosen_rewards`` / ``rejected_rewards``: ``(B,)``, detached. ``metrics``: extra detached
    scalars with TRL's names (``nll_loss``, ``logps/chosen``, ``logps/rejected``,
    ``log_odds_ratio``, ``log_odds_chosen`` ...).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
