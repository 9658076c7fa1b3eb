"""TRL-shaped configuration classes: ``CPOConfig``, ``DPOConfig``, ``ORPOConfig``, ``RewardConfig``.

Each is a dataclass subclass of :class:`preftune.cli_args.PreftuneTrainingArguments` (so every
``transformers.TrainingArguments`` field works, and ``HfArgumentParser`` turns it into flags) with
TRL 1.16's loss and data fields under TRL's names. :meth:`_TRLConfig.preftune_groups` maps them onto
preftune's configuration groups (:mod:`preftune.config`); a value preftune cannot honour is a
:class:`preftune.config.ConfigError` at construction, never silently ignored.

TRL's defaults are kept where they differ from preftune's CLI: ``learning_rate`` 1e-6,
``max_length`` 1024, no ``max_prompt_length``, ``beta`` 0.1 for every ``loss_type`` (also SimPO),
``cpo_alpha`` 1.0 (so CPO's ``loss_type="simpo"`` is CPO-SimPO, as in TRL), ``disable_dropout``
True, activation (gradient) checkpointing on, DPO's ``truncation_mode`` ``keep_start``. Deliberate
differences (documented in ``docs/python-api.md``): ``bf16`` defaults to True only on a CUDA device
that supports it (TRL: whenever ``fp16`` is off, CPU included); ``padding_free`` and DPO's
``precompute_ref_log_probs`` default to True (preftune's engine: the same numbers, faster).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from preftune.cli_args import PreftuneTrainingArguments, negatable_bools
from preftune.config import (
    DataArguments,
    EngineArguments,
    LossArguments,
    ModelArguments,
    PeftArguments,
    RunConfig,
)
from preftune.errors import ConfigError
from preftune.losses import TABLE, dpo_options_problem

# TRL loss_type values that are the variants of preftune's cpo / dpo losses (the loss table's)
CPO_LOSS_TYPES = tuple(TABLE["cpo"].variants)
DPO_LOSS_TYPES = tuple(TABLE["dpo"].variants)


def _help(text: str) -> dict:
    return {"help": text}


@negatable_bools
@dataclass
class _TRLConfig(PreftuneTrainingArguments):
    """Fields shared by the TRL-shaped configs (TRL 1.16 names and defaults, plus preftune's engine)."""

    _argument_group_name = "trl-style config"
    _VALID_DICT_FIELDS = [*PreftuneTrainingArguments._VALID_DICT_FIELDS, "model_init_kwargs"]
    _trainer_name: ClassVar[str] = ""
    # TRL field -> the only value preftune supports (any other value is a ConfigError)
    _unsupported: ClassVar[dict[str, Any]] = {"generate_during_eval": False}

    # transformers fields whose defaults TRL changes
    learning_rate: float = field(default=1e-6, metadata=_help("Initial AdamW learning rate (TRL's 1e-6)."))
    bf16: Optional[bool] = field(
        default=None, metadata=_help("bf16 mixed precision; default: on for a CUDA device with bf16 support."))
    # model
    model_init_kwargs: Optional[Union[dict, str]] = field(
        default=None, metadata=_help("from_pretrained keywords for a model given by name: dtype (or torch_dtype), "
                                     "attn_implementation (None: the model's default), trust_remote_code, "
                                     "revision, device_map ... (passed as given)."))
    trust_remote_code: bool = field(default=False, metadata=_help("Allow custom model code from the Hub."))
    disable_dropout: bool = field(default=True, metadata=_help("Set every dropout probability to 0 (LoRA's too)."))
    chat_template_path: Optional[str] = field(
        default=None, metadata=_help("Chat template for the tokenizer: a Jinja file, or a tokenizer's directory / id."))
    # data
    dataset_num_proc: Optional[int] = field(
        default=None, metadata=_help("Accepted for TRL scripts; tokenisation runs in-process."))
    max_length: Optional[int] = field(default=1024, metadata=_help("Max tokens of prompt + completion."))
    max_prompt_length: Optional[int] = field(
        default=None, metadata=_help("Max prompt tokens (older TRL releases; TRL 1.16 has none)."))
    max_completion_length: Optional[int] = field(default=None, metadata=_help("Max completion tokens."))
    truncation_mode: str = field(
        default="keep_end", metadata=_help("Prompt truncation under max_prompt_length: keep_end or keep_start."))
    dataset_format: Optional[list[str]] = field(
        default=None, metadata=_help("Force the record format (preftune's --dataset_format); default: detected."))
    columns: Optional[list[str]] = field(
        default=None, metadata=_help("Rename columns first, old=new ... (preftune's --columns)."))
    language_pairs: Optional[str] = field(default=None, metadata=_help("MT triplet data: directions to train."))
    cpo_scorer: Optional[str] = field(default=None, metadata=_help("MT triplet data: score field suffix."))
    chat_style: bool = field(default=False, metadata=_help("MT triplet data: wrap prompts in the chat template."))
    # loss
    beta: float = field(default=0.1, metadata=_help("Temperature (ORPO: lambda)."))
    router_aux_loss_coef: Optional[float] = field(
        default=None, metadata=_help("MoE router load-balancing loss weight; default: the model config's."))
    # TRL features preftune does not implement: accepted only at their defaults
    generate_during_eval: bool = field(default=False, metadata=_help("Not supported (must stay False)."))
    is_encoder_decoder: Optional[bool] = field(
        default=None, metadata=_help("Accepted for TRL scripts; the model's kind is detected from the model."))
    # preftune's engine
    share_prompt: bool = field(default=True, metadata=_help("Prompt computed once for chosen and rejected."))
    padding_free: bool = field(default=True, metadata=_help("Pack pairs without padding (preftune's default)."))
    max_tokens_per_batch: Optional[int] = field(default=None, metadata=_help("Token budget per packed row."))
    logprob_chunk_size: Optional[int] = field(default=None, metadata=_help("Completion tokens per LM-head chunk."))
    flush_denormal: bool = field(default=True, metadata=_help("CPU: flush denormal floats to zero."))

    def __post_init__(self) -> None:
        import torch

        # TRL turns activation checkpointing on unless asked otherwise (either spelling)
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        if self.bf16 is None:
            self.bf16 = (not self.fp16 and not self.use_cpu and torch.cuda.is_available()
                         and torch.cuda.is_bf16_supported())
        super().__post_init__()
        self.preftune_groups()  # validate now, as TRL's configs do

    # ---- mapping onto preftune's groups -------------------------------------------------------
    def loss_fields(self) -> dict[str, Any]:
        """The :class:`LossArguments` keywords of this config (per subclass)."""
        raise NotImplementedError

    def _pick(self, group: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """Fields of ``group`` this config also has (same name), with this config's values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(group)
                if f.init and not f.name.startswith("_") and f.name not in skip and hasattr(self, f.name)}

    def _data_fields(self) -> dict[str, Any]:
        """The :class:`DataArguments` keywords; a ``max_prompt_length`` above ``max_length`` (TRL accepts it)
        becomes ``max_length``, which truncates every pair the same way (a prompt that fills ``max_length``
        leaves no completion: the pair is dropped and counted) and which ``preftune train`` accepts too."""
        fields = self._pick(DataArguments, skip=("dataset", "eval_file", "eval_ratio"))
        budget, total = fields.get("max_prompt_length"), fields.get("max_length")
        if budget and total and budget > total:
            fields["max_prompt_length"] = total
        return fields

    def preftune_groups(self, model_args: Optional[ModelArguments] = None,
                        peft_args: Optional[PeftArguments] = None) -> RunConfig:
        """The :class:`~preftune.config.RunConfig` (model, peft, data, loss, engine, training = ``self``)
        that :func:`preftune.train.setup` and ``preftune.train(config)`` take.

        Raises :class:`ConfigError` (prefixed with the class name) for an invalid or unsupported value.
        """
        name = type(self).__name__
        try:
            groups = [DataArguments(**self._data_fields()),
                      LossArguments(**{**self._pick(LossArguments), **self.loss_fields()}),
                      EngineArguments(**self._pick(EngineArguments))]
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from None
        consumed = {f.name for g in groups for f in dataclasses.fields(g)}
        for key, supported in self._unsupported.items():
            value = getattr(self, key)
            if key not in consumed and value != supported:
                raise ConfigError(f"{name}: {key}={value!r} is a TRL feature preftune does not implement; "
                                  f"leave it at {supported!r}")
        data, loss, engine = groups
        return RunConfig(model_args or ModelArguments(), peft_args or PeftArguments(), data, loss, engine, self)


@negatable_bools
@dataclass
class CPOConfig(_TRLConfig):
    """TRL 1.16's ``CPOConfig`` on preftune (CPO: Xu et al. 2024, arXiv 2401.08417, eq. 3; SimPO:
    Meng et al. 2024, arXiv 2405.14734, eq. 6; CPO-SimPO = SimPO + the CPO BC term).

    ``loss_type``: ``sigmoid`` / ``hinge`` / ``ipo`` → preftune's ``cpo`` with that ``cpo_loss_type``;
    ``simpo`` → ``cpo-simpo`` when ``cpo_alpha`` > 0 (TRL's default 1.0), else ``simpo``; ``alphapo``
    → ``simpo`` with ``cpo_alpha`` 0 (as TRL). ``alpha`` != 0 is AlphaPO's reward shape (Gupta et al. 2025,
    arXiv 2501.03884) for every ``loss_type``, as in TRL (:func:`preftune.losses.alpha_reward`).
    """

    _trainer_name: ClassVar[str] = "CPO"

    loss_type: str = field(default="sigmoid", metadata=_help(f"{', '.join(CPO_LOSS_TYPES)}, simpo or alphapo."))
    label_smoothing: float = field(default=0.0, metadata=_help("Label smoothing (sigmoid, simpo)."))
    cpo_alpha: float = field(default=1.0, metadata=_help("Weight of the BC (chosen NLL) term."))
    simpo_gamma: float = field(default=0.5, metadata=_help("SimPO target reward margin."))
    alpha: float = field(default=0.0, metadata=_help("AlphaPO reward shape r = (1 - p^-alpha) / alpha; 0: off."))

    def __post_init__(self) -> None:
        if self.loss_type == "alphapo":  # TRL's shorthand
            self.loss_type, self.cpo_alpha = "simpo", 0.0
        super().__post_init__()

    def loss_fields(self) -> dict[str, Any]:
        if self.loss_type == "alphapo":  # also when set after construction (older trainer keywords)
            self.loss_type, self.cpo_alpha = "simpo", 0.0
        if self.loss_type in CPO_LOSS_TYPES:
            loss = {"loss": "cpo", "cpo_loss_type": self.loss_type}
        elif self.loss_type == "simpo":
            loss = {"loss": "cpo-simpo" if self.cpo_alpha > 0 else "simpo", "simpo_gamma": self.simpo_gamma}
        else:
            raise ConfigError(f"CPOConfig: loss_type {self.loss_type!r} is not valid; choose one of: "
                              f"{', '.join(CPO_LOSS_TYPES)}, simpo, alphapo")
        return {**loss, "beta": self.beta, "label_smoothing": self.label_smoothing, "cpo_alpha": self.cpo_alpha}


@negatable_bools
@dataclass
class ORPOConfig(_TRLConfig):
    """TRL 1.16's ``ORPOConfig`` on preftune's ``orpo`` loss (Hong et al. 2024, arXiv 2403.07691, eq. 6;
    ``beta`` is lambda). The NLL term is the paper's per-token mean over the chosen completion
    (TRL's covers the prompt too; ``docs/parity.md``)."""

    _trainer_name: ClassVar[str] = "ORPO"

    padding_value: Optional[int] = field(
        default=None, metadata=_help("Accepted for TRL scripts; preftune's engine packs pairs without padding."))

    def loss_fields(self) -> dict[str, Any]:
        return {"loss": "orpo", "beta": self.beta}


@negatable_bools
@dataclass
class DPOConfig(_TRLConfig):
    """TRL 1.16's ``DPOConfig`` on preftune's ``dpo`` loss (Rafailov et al. 2023, arXiv 2305.18290, eq. 7).

    ``loss_type``: a name of TRL 1.16's list (``sigmoid``, ``hinge``, ``ipo``, ``exo_pair``, ``nca_pair``,
    ``robust``, ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``,
    ``discopop``, ``sft``, ``sigmoid_norm``) or a list of them, summed with ``loss_weights`` (MPO), as
    preftune's ``dpo_loss_type`` / ``loss_weights``; ``[<type>, "sft"]`` with weights ``[1, w]`` is RPO,
    preftune's ``rpo_alpha`` = ``w`` (Pang et al. 2024, arXiv 2404.19733); ``["sft"]`` alone is preftune's
    ``sft``. ``rpo_alpha`` (older TRL releases) is accepted too. ``f_divergence_type`` /
    ``f_alpha_divergence_coef`` (f-DPO), ``discopop_tau``, ``ld_alpha`` (LD-DPO), ``use_weighting`` (WPO) and
    ``sync_ref_model`` / ``ref_model_mixup_alpha`` / ``ref_model_sync_steps`` (TR-DPO; also with LoRA and
    precomputed reference log-probs, which TRL refuses) as in TRL. ``precompute_ref_log_probs`` defaults to True here (TRL: False): the reference
    log-probs are computed once before training (cached on disk) instead of in every step — the same
    numbers (``tests/test_train.py``).
    """

    _trainer_name: ClassVar[str] = "DPO"
    _unsupported: ClassVar[dict[str, Any]] = {
        **_TRLConfig._unsupported, "activation_offloading": False, "pad_token": None}

    truncation_mode: str = field(default="keep_start", metadata=_help("Prompt truncation: keep_start or keep_end."))
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"],
                                 metadata=_help(f"One or several of {', '.join(DPO_LOSS_TYPES)}."))
    loss_weights: Optional[list[float]] = field(default=None, metadata=_help("Weights of the loss_type terms."))
    label_smoothing: float = field(default=0.0, metadata=_help("Label smoothing / robust DPO flip rate."))
    rpo_alpha: Optional[float] = field(default=None, metadata=_help("Weight of the chosen NLL (RPO)."))
    precompute_ref_log_probs: bool = field(
        default=True, metadata=_help("Reference log-probs once before training (preftune's default; TRL: False)."))
    precompute_ref_batch_size: Optional[int] = field(
        default=None, metadata=_help("Pairs per reference batch (default per_device_eval_batch_size)."))
    pad_to_multiple_of: Optional[int] = field(
        default=None, metadata=_help("Accepted for TRL scripts; preftune's engine packs pairs without padding."))
    ld_alpha: Optional[float] = field(default=None, metadata=_help("LD-DPO: weight of tokens beyond the shared length."))
    f_divergence_type: str = field(default="reverse_kl", metadata=_help(
        "f-DPO: reverse_kl, forward_kl, js_divergence or alpha_divergence."))
    f_alpha_divergence_coef: float = field(default=0.5, metadata=_help("f-DPO: alpha_divergence's coefficient."))
    use_weighting: bool = field(default=False, metadata=_help("WPO: weigh each pair by its aligned probability."))
    discopop_tau: float = field(default=0.05, metadata=_help("DiscoPOP's temperature (loss_type discopop)."))
    activation_offloading: bool = field(default=False, metadata=_help("Not supported."))
    sync_ref_model: bool = field(default=False, metadata=_help("TR-DPO: the reference follows the policy."))
    ref_model_mixup_alpha: float = field(default=0.6, metadata=_help("TR-DPO: ref <- a policy + (1 - a) ref."))
    ref_model_sync_steps: int = field(default=512, metadata=_help("TR-DPO: steps between reference updates."))
    pad_token: Optional[str] = field(default=None, metadata=_help("Deprecated in TRL; set tokenizer.pad_token."))

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        super().__post_init__()

    def _sync_fields(self) -> dict[str, Any]:
        # TR-DPO's two parameters are read with sync_ref_model only (TRL ignores them without it)
        return {"sync_ref_model": True, "ref_model_mixup_alpha": self.ref_model_mixup_alpha,
                "ref_model_sync_steps": self.ref_model_sync_steps} if self.sync_ref_model else {}

    def loss_fields(self) -> dict[str, Any]:
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        weights = self.loss_weights
        if weights is not None and len(weights) != len(types):
            raise ConfigError(f"loss_weights has {len(weights)} entries for {len(types)} loss_type entries")
        weights = list(weights) if weights is not None else [1.0] * len(types)
        unknown = [t for t in types if t not in DPO_LOSS_TYPES]
        if not types or unknown:
            raise ConfigError(f"loss_type {types} is not supported; give one or several of "
                              f"{', '.join(DPO_LOSS_TYPES)}")
        if types == ["sft"]:
            return {"loss": "sft", "label_smoothing": self.label_smoothing, "loss_weights": None,
                    "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5, "discopop_tau": 0.05,
                    "ld_alpha": self.ld_alpha, "use_weighting": self.use_weighting, **self._sync_fields()}
        rpo_alpha = self.rpo_alpha
        if "sft" in types and rpo_alpha is not None:
            raise ConfigError("give the NLL weight once: rpo_alpha or loss_type [..., 'sft'], not both")
        problem = dpo_options_problem(types, weights, self.label_smoothing, self.f_divergence_type, self.discopop_tau,
                                      ld_alpha=self.ld_alpha, use_weighting=self.use_weighting)
        if problem is not None:  # in TRL's field names
            raise ConfigError(problem.replace("--dpo_loss_type", "loss_type").replace("--", ""))
        loss = {"beta": self.beta, "label_smoothing": self.label_smoothing, "loss": "dpo",
                "f_divergence_type": self.f_divergence_type, "f_alpha_divergence_coef": self.f_alpha_divergence_coef,
                "discopop_tau": self.discopop_tau, "ld_alpha": self.ld_alpha, "use_weighting": self.use_weighting,
                **self._sync_fields()}
        if len(types) == 2 and types[1] == "sft" and types[0] != "sft" and weights[0] == 1.0:
            # RPO as TRL 1.16 writes it: preftune's rpo_alpha (the same numbers)
            return {**loss, "dpo_loss_type": types[0], "loss_weights": None, "rpo_alpha": weights[1]}
        return {**loss, "dpo_loss_type": types, "loss_weights": weights if self.loss_weights is not None else None,
                "rpo_alpha": rpo_alpha}


@negatable_bools
@dataclass
class RewardConfig(_TRLConfig):
    """TRL 1.16's ``RewardConfig`` on preftune's ``rm`` loss: a Bradley-Terry reward model,
    ``loss = -log sigmoid(r_chosen - r_rejected)`` (Ouyang et al. 2022, arXiv 2203.02155, eq. 1), plus
    ``center_rewards_coefficient * mean((r_chosen + r_rejected)^2)`` (Eisenstein et al. 2023,
    arXiv 2312.09244, eq. 2) when set. There is no ``beta``. TRL drops a pair longer than
    ``max_length``; preftune truncates it (and counts it in the data report).
    """

    _trainer_name: ClassVar[str] = "Reward"
    _unsupported: ClassVar[dict[str, Any]] = {
        **_TRLConfig._unsupported, "eos_token": None, "activation_offloading": False,
        "pad_token": None}

    learning_rate: float = field(default=1e-4, metadata=_help("Initial AdamW learning rate (TRL's 1e-4)."))
    beta: Optional[float] = field(default=None, metadata=_help("Not used by a reward model (must stay None)."))
    center_rewards_coefficient: Optional[float] = field(
        default=None, metadata=_help("Weight of the reward-centering term (TRL recommends 0.01)."))
    pad_to_multiple_of: Optional[int] = field(
        default=None, metadata=_help("Accepted for TRL scripts; preftune's engine packs pairs without padding."))
    eos_token: Optional[str] = field(default=None, metadata=_help("Not supported (the tokenizer's eos is used)."))
    activation_offloading: bool = field(default=False, metadata=_help("Not supported."))
    pad_token: Optional[str] = field(default=None, metadata=_help("Deprecated in TRL; set tokenizer.pad_token."))

    def loss_fields(self) -> dict[str, Any]:
        return {"loss": "rm", "beta": self.beta, "center_rewards_coefficient": self.center_rewards_coefficient}


@negatable_bools
@dataclass
class KTOConfig(_TRLConfig):
    """TRL 1.16's ``KTOConfig`` on preftune's ``kto`` / ``apo_zero_unpaired`` losses (KTO: Ethayarajh et al.
    2024, arXiv 2402.01306, Eq. 7; APO-zero unpaired: D'Oosterlinck et al. 2024, arXiv 2408.06266).

    ``loss_type``: ``kto`` or ``apo_zero_unpaired``; ``desirable_weight`` / ``undesirable_weight`` as in TRL.
    ``train_sampling_strategy`` defaults to ``sequential`` as in TRL (each example's KL partner is the
    completion of its neighbour in its block of ``per_device_train_batch_size``; preftune fixes the partners
    before training, so another strategy is accepted too). ``precompute_ref_log_probs`` defaults to True here
    (TRL: False), as for :class:`DPOConfig`: the same numbers, computed once.
    """

    _trainer_name: ClassVar[str] = "KTO"
    _unsupported: ClassVar[dict[str, Any]] = {
        **_TRLConfig._unsupported, "sync_ref_model": False, "activation_offloading": False}

    train_sampling_strategy: str = field(default="sequential", metadata=_help(
        "Batch order: sequential (TRL's KTO default), random or group_by_length."))
    truncation_mode: str = field(default="keep_start", metadata=_help("Prompt truncation: keep_start or keep_end."))
    loss_type: str = field(default="kto", metadata=_help("kto or apo_zero_unpaired."))
    desirable_weight: float = field(default=1.0, metadata=_help("Weight of the desirable examples' losses."))
    undesirable_weight: float = field(default=1.0, metadata=_help("Weight of the undesirable examples' losses."))
    precompute_ref_log_probs: bool = field(
        default=True, metadata=_help("Reference log-probs once before training (preftune's default; TRL: False)."))
    precompute_ref_batch_size: Optional[int] = field(
        default=None, metadata=_help("Examples per reference batch (default per_device_eval_batch_size)."))
    pad_to_multiple_of: Optional[Union[int, str]] = field(
        default=None, metadata=_help("Accepted for TRL scripts; preftune's engine packs examples without padding."))
    activation_offloading: bool = field(default=False, metadata=_help("Not supported."))
    sync_ref_model: bool = field(default=False, metadata=_help("TR-DPO for KTO; not supported."))
    ref_model_mixup_alpha: float = field(default=0.6, metadata=_help("TR-DPO; unused."))
    ref_model_sync_steps: int = field(default=512, metadata=_help("TR-DPO; unused."))

    def loss_fields(self) -> dict[str, Any]:
        if self.loss_type not in ("kto", "apo_zero_unpaired"):
            raise ConfigError(f"loss_type {self.loss_type!r} is not supported; give kto or apo_zero_unpaired")
        return {"loss": self.loss_type, "beta": self.beta, "desirable_weight": self.desirable_weight,
                "undesirable_weight": self.undesirable_weight}
