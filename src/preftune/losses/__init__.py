"""Preference-optimisation losses over per-sequence log-probabilities.

Every loss is a pure function ``fn(logps: PolicyLogps, *, <hyper-parameters>) -> LossOutput``:

* inputs (:class:`preftune.types.PolicyLogps`): summed completion log-probs (nats) of the chosen
  and rejected completions ``(B,)``, their token counts ``(B,)`` and, for DPO, the same sums
  under the reference policy ``(B,)``;
* output (:class:`preftune.types.LossOutput`): the per-example loss ``(B,)`` whose mean is the
  batch loss, detached chosen / rejected rewards ``(B,)`` and detached scalar metrics named as
  TRL 1.16 names them (``logps/chosen``, ``logps/rejected``, ``nll_loss``; ORPO adds
  ``log_odds_ratio`` and ``log_odds_chosen``). ``logps/*`` are the batch means of the log-probs
  *as the loss used them*: per-token averages where the loss length-normalises (CPO-IPO, SimPO,
  ORPO), sums otherwise (CPO sigmoid/hinge, every DPO variant, SFT) - what TRL logs.

The reward-model loss ``rm`` (:func:`rm_loss`) is the one entry over scalar rewards instead:
its input is :class:`preftune.types.PairRewards` (value-head outputs ``(B,)``), its metrics are
TRL ``RewardTrainer``'s (``accuracy``, ``margin``, ``min_reward``, ``mean_reward``, ``max_reward``).

The NLL ("BC") regulariser. TRL computes it as one token-mean cross-entropy over all chosen
completion tokens of the batch: ``NLL = -sum_i chosen_logps_i / sum_i chosen_lengths_i``. To
keep a per-example loss whose *mean* is the batch loss, it is spread over the examples as
``nll_i = -chosen_logps_i * B / sum_j chosen_lengths_j`` (see :func:`chosen_nll`), so
``mean_i nll_i`` is exactly TRL's value and so are its gradients. The logged ``nll_loss`` is the
unweighted NLL (0 when the loss has no NLL term), as in TRL.

Global batches (gradient accumulation, several ranks): the NLL-carrying losses (``cpo``,
``simpo``, ``cpo-simpo``, ``dpo`` with ``rpo_alpha``, ``sft``) take ``num_pairs_total`` ``N`` and
``nll_normaliser`` ``T``, the pairs and chosen completion tokens of the *whole* optimizer step
(:class:`preftune.distributed.GlobalCounts`), and spread the NLL as
``nll_i = -chosen_logps_i * N / T``. Then ``sum_i losses_i / N`` over a micro-batch is its exact
share of the full-batch loss ``mean_i term_i + alpha * (-sum_i chosen_logps_i / T)``, and the
shares of all micro-batches add up to it, however the batch is split. The defaults (``B`` and the
batch's own token count) give the per-batch loss above. Every other term is per pair, so the
split only needs the ``1 / N`` weighting, which the trainer applies.

Precision: float16 / bfloat16 inputs are promoted to float32 for the loss arithmetic (token
counts above 256 are not exact in bfloat16); float32 / float64 inputs are kept as they are. The
returned tensors have that compute dtype; gradients flow back to the inputs in their own dtype.

Layout, one loss family a module: :mod:`~preftune.losses.base` (input checks, :func:`chosen_nll`,
the preference terms, :class:`Variant`, the output builder), :mod:`~preftune.losses.cpo` (cpo,
simpo, cpo-simpo; AlphaPO's ``alpha``), :mod:`~preftune.losses.orpo`, :mod:`~preftune.losses.dpo` (DPO,
its mixtures and f-DPO) with :mod:`~preftune.losses.dpo_terms` (one function per DPO ``loss_type``),
:mod:`~preftune.losses.sft`, :mod:`~preftune.losses.reward` (rm) and :mod:`~preftune.losses.table`:
the loss table :data:`TABLE` (``--loss`` name -> :class:`LossSpec`: function, hyper-parameters and
their per-loss defaults, reference, input kind, variants, NLL weight), from which the
configuration, the CLI help, the aliases and the TRL configs derive; :func:`get_loss_fn` looks a
function up and :func:`compute_loss` runs the one chosen by a :class:`~preftune.config.LossArguments`.
"""

from .base import (
    LossFn,
    PreferenceTerm,
    Variant,
    chosen_nll,
    hinge_term,
    ipo_term,
    robust_term,
    sigmoid_term,
)
from .cpo import CPO_VARIANTS, alpha_reward, cpo_loss, cpo_simpo_loss, simpo_loss
from .dpo import DPO_VARIANTS, dpo_loss, dpo_options_problem, loss_type_list
from .dpo_terms import F_DIVERGENCES, DPOVariant, f_scores
from .orpo import log1mexp, orpo_loss
from .reward import rm_loss
from .sft import sft_loss
from .table import (
    LOGPS,
    LOSS_FUNCTIONS,
    LOSS_NAMES,
    REWARDS,
    TABLE,
    UNPAIRED_LOGPS,
    LossSpec,
    compute_loss,
    get_loss_fn,
    get_spec,
    options_problem,
)

__all__ = [
    "CPO_VARIANTS", "DPO_VARIANTS", "F_DIVERGENCES", "LOGPS", "LOSS_FUNCTIONS", "LOSS_NAMES", "REWARDS", "TABLE", "UNPAIRED_LOGPS",
    "DPOVariant", "LossFn", "LossSpec", "alpha_reward", "dpo_options_problem", "f_scores", "loss_type_list", "options_problem", "PreferenceTerm", "Variant", "chosen_nll", "compute_loss", "cpo_loss", "cpo_simpo_loss",
    "dpo_loss", "get_loss_fn", "get_spec", "hinge_term", "ipo_term", "log1mexp", "orpo_loss", "rm_loss",
    "robust_term", "sft_loss", "sigmoid_term", "simpo_loss",
]
