"""LoRA adapters (peft) and the reference policy of DPO-style losses without a second model copy.

Reference policy (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7: pi_ref is the
policy training starts from):

* fresh adapter: the starting policy is the base model, obtained by disabling the adapters;
* continuing an existing adapter (``--peft_model_id``): the starting policy is base + that adapter
  *as loaded*, not the bare base. We load the adapter a second time, frozen, under the name
  ``"reference"`` and switch to it inside :func:`reference_context`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from preftune.config import PeftArguments
from preftune.engine.kinds import kind_for
from preftune.engine.kinds.base import attention_input_projections
from preftune.errors import ModelLoadError, UnsupportedModelError
from preftune.modeling import is_peft_model

from .lora_dropout import fuse_lora_dropout

logger = logging.getLogger("preftune.models")

REFERENCE_ADAPTER = "reference"
TRAIN_ADAPTER = "default"


class ReferenceModelRequiredError(RuntimeError):
    """A reference policy was asked of a model that has no adapter to switch off."""


_KIND = object()  # apply_peft: the model kind's choice


def apply_peft(model, peft_args: PeftArguments, *, with_reference_adapter: bool = False, task_type=_KIND,
               modules_to_save=_KIND):
    """Wrap ``model`` with LoRA (Hu et al. 2021, "LoRA": W + (alpha/r) B A) and return the ``PeftModel``.

    * ``peft_args.peft_model_id`` set: that adapter is loaded trainable (``is_trainable=True``) and its
      own ``LoraConfig`` is used (the ``--lora_*`` flags are ignored, which is logged). With
      ``with_reference_adapter`` it is loaded a second time, frozen, as the reference
      (:func:`setup_reference_adapter`).
    * otherwise a fresh adapter: ``r``, ``alpha``, ``dropout``, ``target_modules`` resolved by
      :func:`resolve_target_modules` (``all-linear`` / ``ALL``, ``DEFAULT``, or module names).
    * 4-bit / 8-bit base weights: ``peft.prepare_model_for_kbit_training`` first (QLoRA, Dettmers et al. 2023).
    * the model's kind (:func:`preftune.engine.kinds.kind_for`) gives the task type (``CAUSAL_LM``;
      encoder–decoder: ``SEQ_2_SEQ_LM``; reward model: ``SEQ_CLS``, LoRA on the body only —
      ``all-linear`` leaves the head out — and the scalar head ``score`` trained fully,
      ``modules_to_save``), and where the targets are taken (vision–language: the language model
      only). A continued adapter must be of the kind's task (a reward model's ``SEQ_CLS`` or not).
    * ``task_type`` / ``modules_to_save`` given: peft's task and modules trained in full as given instead
      of the kind's (a reward model's ``LoraConfig`` through the TRL door: peft decides what trains).

    Raises:
        ModelLoadError: ``model`` is already a ``PeftModel``, or the adapter directory is missing.
    """
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if is_peft_model(model):
        raise ModelLoadError("apply_peft: the model already has peft adapters")
    kind = kind_for(model)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if peft_args.peft_model_id:
        if not Path(peft_args.peft_model_id, "adapter_config.json").is_file():
            raise ModelLoadError(f"--peft_model_id {peft_args.peft_model_id}: no adapter_config.json there")
        _check_adapter_task(peft_args.peft_model_id, kind.peft_task_type)
        peft_model = PeftModel.from_pretrained(model, peft_args.peft_model_id, is_trainable=True,
                                               adapter_name=TRAIN_ADAPTER)
        cfg = peft_model.peft_config[TRAIN_ADAPTER]
        logger.info("Continuing adapter %s (r=%s, alpha=%s, targets=%s); --lora_* flags are ignored",
                    peft_args.peft_model_id, cfg.r, cfg.lora_alpha, cfg.target_modules)
        if with_reference_adapter:
            setup_reference_adapter(peft_model, peft_args.peft_model_id)
        return fuse_lora_dropout(peft_model)
    target_modules = kind.lora_targets(model, resolve_target_modules(model, peft_args.lora_target_modules))
    if task_type is _KIND:
        task_type = kind.peft_task_type
    if modules_to_save is _KIND:
        modules_to_save = list(kind.modules_to_save) if kind.modules_to_save else None
    config = LoraConfig(r=peft_args.lora_r, lora_alpha=peft_args.lora_alpha, lora_dropout=peft_args.lora_dropout,
                        target_modules=target_modules, task_type=task_type, bias="none",
                        modules_to_save=modules_to_save)
    return fuse_lora_dropout(get_peft_model(model, config, adapter_name=TRAIN_ADAPTER))


def resolve_target_modules(model: nn.Module, names) -> str | list[str]:
    """What peft's ``LoraConfig(target_modules=...)`` gets for ``--lora_target_modules names``.

    * ``all-linear`` or ``ALL`` (ms-swift): peft's ``"all-linear"``, every linear layer except the
      output head; it cannot be combined with other names;
    * ``DEFAULT`` or ``AUTO`` (ms-swift): the model kind's default targets, plus any other names
      given: the attention's query/key/value projections
      (:func:`preftune.engine.kinds.base.attention_input_projections`); for an encoder–decoder
      model (T5, BART ...) the query and value projections of every attention (encoder, decoder,
      cross-attention: T5 ``q v``, BART ``q_proj v_proj``), peft's and the LoRA paper's choice
      (:func:`preftune.engine.kinds.seq2seq.encoder_decoder_default_targets`);
    * anything else: module names, as given (duplicates removed).

    Raises:
        ModelLoadError: ``all-linear`` combined with names, or ``DEFAULT`` on a model without
            recognisable attention projections.
    """
    names = list(names)
    if any(n in ("all-linear", "ALL") for n in names):
        if len(names) > 1:
            raise ModelLoadError(f"--lora_target_modules {' '.join(names)}: all-linear cannot be combined with "
                                 "names (ALL means all-linear)")
        return "all-linear"
    resolved: list[str] = []
    for name in names:
        if name in ("DEFAULT", "AUTO"):
            found = _default_targets(model)
            logger.info("--lora_target_modules %s: the attention projections %s", name, " ".join(found))
            resolved += found
        else:
            resolved.append(name)
    return list(dict.fromkeys(resolved))


def _default_targets(model: nn.Module) -> list[str]:
    """``DEFAULT`` targets of ``model``'s kind; the generic attention rule for a module no kind supports
    (it names what is missing)."""
    try:
        kind = kind_for(model)
    except UnsupportedModelError:
        return attention_input_projections(model)
    return kind.default_lora_targets(model)


def _check_adapter_task(adapter_dir: str, task_type: str) -> None:
    """A continued adapter must be of the kind being trained (reward model: ``SEQ_CLS``; else not)."""
    import json

    task = json.loads(Path(adapter_dir, "adapter_config.json").read_text()).get("task_type")
    reward_head = task_type == "SEQ_CLS"
    if reward_head and task != "SEQ_CLS":
        raise ModelLoadError(f"--peft_model_id {adapter_dir}: a {task} adapter, not a reward model's (SEQ_CLS); "
                             "--loss rm continues only reward-model adapters (drop --peft_model_id to start one)")
    if not reward_head and task == "SEQ_CLS":
        raise ModelLoadError(f"--peft_model_id {adapter_dir}: a reward model's adapter (SEQ_CLS); continue it "
                             "with --loss rm")


def setup_reference_adapter(model, peft_model_id: str) -> None:
    """Load the adapter at ``peft_model_id`` a second time, frozen, as adapter ``"reference"``.

    The training adapter stays active and keeps its ``requires_grad`` exactly; every parameter of
    the reference adapter has ``requires_grad=False``, so it is outside any optimizer built from
    trainable parameters. Save the trained result with :func:`save_adapter`.

    Raises:
        ModelLoadError: ``model`` is not a ``PeftModel`` or already has a reference adapter.
    """
    if not is_peft_model(model):
        raise ModelLoadError("setup_reference_adapter needs a PeftModel (apply_peft first)")
    if REFERENCE_ADAPTER in model.peft_config:
        raise ModelLoadError(f"the model already has an adapter named {REFERENCE_ADAPTER!r}")
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    active = model.active_adapter
    model.load_adapter(peft_model_id, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.set_adapter(active)
    _restore_requires_grad(model, grads)


def _restore_requires_grad(model: nn.Module, grads: dict[str, bool]) -> None:
    """Set every parameter's requires_grad to its value in ``grads``; parameters not listed (the
    reference adapter) are frozen."""
    for name, param in model.named_parameters():
        param.requires_grad_(grads.get(name, False) and REFERENCE_ADAPTER not in name.split("."))


@contextmanager
def reference_context(model) -> Iterator[None]:
    """Context under which ``model(...)`` computes the reference policy pi_ref (DPO eq. 7).

    * ``PeftModel`` with a ``"reference"`` adapter: that adapter (the starting state of a continued
      adapter) is made the active one;
    * other ``PeftModel``: adapters disabled, i.e. the base model;
    * no peft: raises.

    On exit the training adapter is active again and every parameter's ``requires_grad`` is exactly
    as before (peft's ``set_adapter``/``enable_adapter_layers`` would otherwise toggle it). The
    context does not switch off autograd or dropout: wrap it in ``torch.no_grad()`` and choose the
    train/eval mode as the caller needs.

    Raises:
        ReferenceModelRequiredError: ``model`` is not a ``PeftModel``.
    """
    if not is_peft_model(model):
        raise ReferenceModelRequiredError(
            "The reference policy of this loss (DPO) needs adapters to switch off (--use_peft), a separate "
            "reference model (preftune.models.load_reference_model) or precomputed reference log-probs "
            "(--precompute_ref_log_probs); the given model has no peft adapter.")
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    if REFERENCE_ADAPTER in model.peft_config:
        active = model.active_adapter
        if active == REFERENCE_ADAPTER:
            raise ModelLoadError("reference_context entered while the reference adapter is already active")
        try:
            model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
            yield
        finally:
            model.set_adapter(active, inference_mode=True)
            _restore_requires_grad(model, grads)
    else:
        try:
            with model.disable_adapter():
                yield
        finally:
            _restore_requires_grad(model, grads)


def save_adapter(model, output_dir: str | Path) -> Path:
    """Save only the trained adapter (never the frozen ``"reference"`` copy) to ``output_dir``.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` directly in ``output_dir``
    (peft puts non-default adapters in sub-directories; only ``"default"`` is selected here).

    Raises:
        ModelLoadError: ``model`` is not a ``PeftModel``.
    """
    if not is_peft_model(model):
        raise ModelLoadError("save_adapter needs a PeftModel; use model.save_pretrained for full models")
    output_dir = Path(output_dir)
    model.save_pretrained(str(output_dir), selected_adapters=[TRAIN_ADAPTER])
    return output_dir
