"""The loss table: one :class:`LossSpec` per ``--loss`` name, and the dispatch over it.

Everything else that knows about losses reads this table: :class:`preftune.config.LossArguments`
(the ``--loss`` choices, per-loss defaults of ``--beta`` and the NLL weights, which flag applies to
which loss, the variant choices of ``--cpo_loss_type`` / ``--dpo_loss_type``, the help texts,
``needs_reference``), the ms-swift aliases (``--rlhf_type``) and the TRL-shaped configs
(``loss_type`` choices). A new loss is one :class:`LossSpec` in :data:`TABLE` (DEVELOPERS.md,
"Adding a loss").

This module reads a ``LossArguments`` duck-typed (its field names, ``getattr``): the losses never
import :mod:`preftune.config`, which imports them.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Optional

from preftune.types import LossOutput, PairRewards, PolicyLogps

from .base import WHERE, LossFn, Variant
from .cpo import CPO_VARIANTS, cpo_loss, cpo_simpo_loss, simpo_loss
from .dpo import DPO_VARIANTS, dpo_loss, dpo_options_problem, ref_sync_problem
from .dpo_terms import DPOVariant
from .kto import kto_loss
from .orpo import orpo_loss
from .reward import rm_loss
from .sft import sft_loss

# What a loss consumes: per-sequence policy log-probs of pairs (PolicyLogps), value-head rewards of
# pairs (PairRewards), or log-probs of unpaired completions and their KL partners with labels (KTO:
# PolicyLogps with ``labels``; the data is made unpaired for it, preftune.data.unpaired).
Consumes = Literal["logps", "rewards", "unpaired_logps"]
LOGPS: Consumes = "logps"
REWARDS: Consumes = "rewards"
UNPAIRED_LOGPS: Consumes = "unpaired_logps"
INPUT_TYPES: dict[str, type] = {LOGPS: PolicyLogps, REWARDS: PairRewards, UNPAIRED_LOGPS: PolicyLogps}

# LossArguments fields that are the weight of a chosen-completion NLL term.
NLL_WEIGHTS = ("cpo_alpha", "rpo_alpha")
# Keywords a loss function may take that come from the trainer, not from LossArguments.
GLOBAL_COUNTS = ("num_pairs_total", "nll_normaliser")


@dataclass(frozen=True)
class LossSpec:
    """One ``--loss`` entry of the table.

    Attributes:
        name: the ``--loss`` value.
        fn: the loss function ``fn(inputs, **hyper-parameters) -> LossOutput``; its inputs are the
            kind named by ``consumes``.
        reads: the :class:`~preftune.config.LossArguments` fields passed to ``fn`` as keywords of the
            same name (the variant flag is passed as ``loss_type``, see ``variant_flag``).
        defaults: per-loss default of a field in ``reads`` that the user left unset (``None``):
            ``beta``, the NLL weight. A field not listed keeps its own default.
        consumes: ``"logps"`` (:class:`~preftune.types.PolicyLogps` of pairs), ``"rewards"``
            (:class:`~preftune.types.PairRewards` of a value head) or ``"unpaired_logps"``
            (:class:`~preftune.types.PolicyLogps` of unpaired examples with ``labels``: KTO).
        needs_reference: the loss compares against a frozen reference policy (reference log-probs in
            the input: precomputed or a live reference model).
        variants: sub-variant name -> :class:`~preftune.losses.base.Variant` or
            :class:`~preftune.losses.dpo_terms.DPOVariant` (its term, whether it takes label
            smoothing); empty when the loss has none.
        variant_flag: the LossArguments field that picks the variant (``cpo_loss_type``), passed to
            ``fn`` as ``loss_type``; None without variants.
        label_smoothing: a loss without variants takes ``--label_smoothing`` (with variants, each
            :class:`Variant` says).
        nll_weight: the NLL weight this loss owns (one of :data:`NLL_WEIGHTS`; it must be in
            ``reads``); a non-zero value of another loss's weight is an error in :func:`compute_loss`.

    Raises (at construction):
        ValueError: an inconsistent entry (unknown ``consumes``, a default or NLL weight not in
            ``reads``, variants without a flag or the reverse).
    """

    name: str
    fn: LossFn
    reads: tuple[str, ...]
    defaults: Mapping[str, float] = field(default_factory=dict)
    consumes: Consumes = LOGPS
    needs_reference: bool = False
    variants: Mapping[str, Variant | DPOVariant] = field(default_factory=dict)
    variant_flag: Optional[str] = None
    label_smoothing: bool = False
    nll_weight: Optional[str] = None
    takes_global_counts: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        problems = [f"consumes {self.consumes!r} is not one of {', '.join(INPUT_TYPES)}"
                    ] if self.consumes not in INPUT_TYPES else []
        problems += [f"default of {k!r}, which it does not read" for k in self.defaults if k not in self.reads]
        if self.nll_weight is not None and (self.nll_weight not in NLL_WEIGHTS or self.nll_weight not in self.reads):
            problems.append(f"nll_weight {self.nll_weight!r} is not one of {NLL_WEIGHTS} in reads")
        if bool(self.variants) != (self.variant_flag is not None):
            problems.append("variants and variant_flag go together")
        if problems:
            raise ValueError(f"{WHERE}: loss table entry {self.name!r}: " + "; ".join(problems))
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "variants", MappingProxyType(dict(self.variants)))
        keywords = set(inspect.signature(self.fn).parameters)
        object.__setattr__(self, "takes_global_counts", all(k in keywords for k in GLOBAL_COUNTS))

    @property
    def smoothed(self) -> tuple[str, ...]:
        """The variants that take label smoothing; ``(name,)`` / ``()`` for a loss without variants."""
        if not self.variants:
            return (self.name,) if self.label_smoothing else ()
        return tuple(k for k, v in self.variants.items() if v.uses_label_smoothing)

    def hparams(self, args: Any) -> dict[str, Any]:
        """The keywords of :attr:`fn` from ``args`` (a LossArguments, read by field name; a field that
        ``args`` lacks is left to the function's default)."""
        out = {name: getattr(args, name) for name in self.reads if hasattr(args, name)}
        if self.variant_flag is not None:
            out["loss_type"] = getattr(args, self.variant_flag)
        return out


def _table(*specs: LossSpec) -> dict[str, LossSpec]:
    return {spec.name: spec for spec in specs}


_SIMPO_READS = ("beta", "simpo_gamma", "label_smoothing", "cpo_alpha", "alpha")
_KTO_READS = ("beta", "desirable_weight", "undesirable_weight")
_DPO_READS = ("beta", "label_smoothing", "rpo_alpha", "loss_weights", "f_divergence_type", "f_alpha_divergence_coef",
              "discopop_tau", "ld_alpha", "use_weighting")

#: ``--loss`` name -> :class:`LossSpec`, in ``--help`` order. Adding a loss: one entry here.
TABLE: dict[str, LossSpec] = _table(
    LossSpec("cpo", cpo_loss, reads=("beta", "label_smoothing", "cpo_alpha", "alpha"),
             defaults={"beta": 0.1, "cpo_alpha": 1.0},
             variants=CPO_VARIANTS, variant_flag="cpo_loss_type", nll_weight="cpo_alpha"),
    LossSpec("simpo", simpo_loss, reads=_SIMPO_READS, defaults={"beta": 2.0, "cpo_alpha": 0.0},
             label_smoothing=True, nll_weight="cpo_alpha"),
    LossSpec("cpo-simpo", cpo_simpo_loss, reads=_SIMPO_READS, defaults={"beta": 2.0, "cpo_alpha": 1.0},
             label_smoothing=True, nll_weight="cpo_alpha"),
    LossSpec("orpo", orpo_loss, reads=("beta", "label_smoothing"), defaults={"beta": 0.1}),
    LossSpec("dpo", dpo_loss, reads=_DPO_READS, defaults={"beta": 0.1},
             needs_reference=True, variants=DPO_VARIANTS, variant_flag="dpo_loss_type", nll_weight="rpo_alpha"),
    LossSpec("kto", kto_loss, reads=_KTO_READS, defaults={"beta": 0.1}, consumes=UNPAIRED_LOGPS, needs_reference=True),
    LossSpec("apo_zero_unpaired", functools.partial(kto_loss, loss_type="apo_zero_unpaired"), reads=_KTO_READS,
             defaults={"beta": 0.1}, consumes=UNPAIRED_LOGPS, needs_reference=True),
    LossSpec("sft", sft_loss, reads=("label_smoothing",)),
    LossSpec("rm", rm_loss, reads=("center_rewards_coefficient",), consumes=REWARDS),
)

LOSS_NAMES: tuple[str, ...] = tuple(TABLE)
LOSS_FUNCTIONS: dict[str, LossFn] = {name: spec.fn for name, spec in TABLE.items()}


def losses_reading(field_name: str) -> tuple[str, ...]:
    """The ``--loss`` names whose entry reads the LossArguments field ``field_name``, in table order."""
    return tuple(name for name, spec in TABLE.items() if field_name in spec.reads or field_name == spec.variant_flag)


def defaults_of(field_name: str) -> dict[str, float]:
    """``--loss`` name -> its default for ``field_name``, for the entries that give one."""
    return {name: spec.defaults[field_name] for name, spec in TABLE.items() if field_name in spec.defaults}


def variant_flags() -> dict[str, tuple[str, ...]]:
    """Variant flag (``cpo_loss_type`` ...) -> its choices, the variant names of the entry that owns it."""
    return {spec.variant_flag: tuple(spec.variants) for spec in TABLE.values() if spec.variant_flag is not None}


def nll_weight_owners() -> dict[str, tuple[str, ...]]:
    """NLL weight field -> the ``--loss`` names that own it (``cpo_alpha``: cpo, simpo, cpo-simpo)."""
    owners: dict[str, tuple[str, ...]] = {}
    for name, spec in TABLE.items():
        if spec.nll_weight is not None:
            owners[spec.nll_weight] = (*owners.get(spec.nll_weight, ()), name)
    return owners


def readers_text(field_name: str) -> str:
    """``cpo/simpo/cpo-simpo``: :func:`losses_reading` as one word, for help texts."""
    return "/".join(losses_reading(field_name))


def defaults_text(field_name: str) -> str:
    """``cpo 0.1, simpo 2.0, ... (sft, rm: none)``: the per-loss defaults of ``field_name``, and the
    losses that do not read it (when some do not), for help texts."""
    text = ", ".join(f"{k} {v}" for k, v in defaults_of(field_name).items())
    rest = [name for name in TABLE if name not in losses_reading(field_name)]
    return text + (f" ({', '.join(rest)}: none)" if rest else "")


def smoothing_text() -> str:
    """``cpo sigmoid, simpo, cpo-simpo, dpo sigmoid/robust``: where label smoothing applies, for help texts."""
    parts = []
    for name, spec in TABLE.items():
        if spec.smoothed:
            parts.append(f"{name} {'/'.join(spec.smoothed)}" if spec.variants else name)
    return ", ".join(parts)


#: LossArguments fields that only some losses read, with the value that leaves them unused: a
#: different value given to a loss that does not read the field is refused (:func:`options_problem`).
UNUSED_VALUES: dict[str, Any] = {"loss_weights": None, "f_divergence_type": "reverse_kl",
                                 "f_alpha_divergence_coef": 0.5, "discopop_tau": 0.05, "alpha": 0.0,
                                 "desirable_weight": 1.0, "undesirable_weight": 1.0, "ld_alpha": None,
                                 "use_weighting": False}


def options_problem(args: Any) -> Optional[str]:
    """What is wrong with the DPO mixture / f-DPO / DiscoPOP / AlphaPO fields of ``args`` (a
    LossArguments, duck-typed) as one line naming the flags, or None: a field of :data:`UNUSED_VALUES`
    set for a loss that does not read it, a list of ``dpo_loss_type`` names for another loss, a
    non-finite ``alpha``, or what :func:`~preftune.losses.dpo.dpo_options_problem` refuses."""
    for name, unused in UNUSED_VALUES.items():
        owners = losses_reading(name)
        if getattr(args, name, unused) != unused and args.loss not in owners:
            return f"--{name} applies to --loss {'/'.join(owners)} only, not {args.loss!r}"
    if not isinstance(getattr(args, "dpo_loss_type", ""), str) and args.loss != "dpo":
        return f"a list of --dpo_loss_type names applies to --loss dpo only, not {args.loss!r}"
    if not math.isfinite(getattr(args, "alpha", 0.0)):
        return f"--alpha must be a finite number, got {args.alpha}"
    if (problem := ref_sync_problem(args, get_spec(args.loss).needs_reference)) is not None:  # TR-DPO
        return problem
    if args.loss != "dpo":
        return None
    return dpo_options_problem(args.dpo_loss_type, args.loss_weights, args.label_smoothing, args.f_divergence_type,
                               args.discopop_tau, args.rpo_alpha, getattr(args, "ld_alpha", None),
                               getattr(args, "use_weighting", False))


def get_spec(name: str) -> LossSpec:
    """The table entry of ``name`` (a ``--loss`` value).

    Raises:
        ValueError: ``name`` is unknown; the message lists the valid names.
    """
    try:
        return TABLE[name]
    except KeyError:
        raise ValueError(f"{WHERE}: unknown loss {name!r}; valid: {', '.join(TABLE)}") from None


def get_loss_fn(name: str) -> LossFn:
    """The loss function registered under ``name`` (a ``--loss`` value).

    Raises:
        ValueError: ``name`` is unknown; the message lists the valid names.
    """
    return get_spec(name).fn


def compute_loss(logps: PolicyLogps | PairRewards, args: Any, *, num_pairs_total: Optional[float] = None,
                 nll_normaliser: Optional[float] = None) -> LossOutput:
    """Run the loss ``args.loss`` with its hyper-parameters from ``args`` on ``logps``.

    Args:
        logps: ``PolicyLogps`` of B pairs (``(B,)`` tensors; reference sums for ``dpo``), or
            :class:`PairRewards` for ``rm`` (what the entry ``consumes``).
        args: a validated :class:`preftune.config.LossArguments` (read by field name: ``loss``, the
            entry's ``reads``, its variant flag and every NLL weight).
        num_pairs_total, nll_normaliser: the global batch's pairs and chosen completion tokens,
            passed to the losses that take them (those with an NLL term; see :mod:`preftune.losses`);
            ignored by the others (their terms are per pair).

    Returns:
        ``LossOutput``; ``losses.mean()`` is the batch loss (with the global counts,
        ``losses.sum() / num_pairs_total`` is this batch's share of the global batch loss).

    Raises:
        ValueError: unknown loss name, inputs of the wrong kind, an NLL weight (``cpo_alpha`` /
            ``rpo_alpha``) set to a non-zero value for a loss that does not own it, or any error of
            the loss itself.
    """
    spec = get_spec(args.loss)
    wants_rewards = spec.consumes == REWARDS
    if isinstance(logps, PairRewards) != wants_rewards:
        raise ValueError(f"{WHERE}: loss {args.loss!r} takes {INPUT_TYPES[spec.consumes].__name__}, "
                         f"got {type(logps).__name__}")
    for weight, owners in nll_weight_owners().items():
        if getattr(args, weight) and args.loss not in owners:
            raise ValueError(f"{WHERE}: --{weight} applies to --loss {'/'.join(owners)} only, "
                             f"not {args.loss!r} (got {getattr(args, weight)})")
    hparams = spec.hparams(args)
    if spec.takes_global_counts:
        for name, value in (("num_pairs_total", num_pairs_total), ("nll_normaliser", nll_normaliser)):
            if value is not None:
                hparams[name] = value
    return spec.fn(logps, **hparams)
