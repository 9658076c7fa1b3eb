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

from .config import PeftArguments
from .lora_dropout import fuse_lora_dropout
from .models import ModelLoadError

logger = logging.getLogger("preftune.models")

REFERENCE_ADAPTER = "reference"
TRAIN_ADAPTER = "default"


class ReferenceModelRequiredError(RuntimeError):
    """A reference policy was asked of a model that has no adapter to switch off."""


def _is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def apply_peft(model, peft_args: PeftArguments, *, with_reference_adapter: bool = False, reward_head: bool = False):
    """Wrap ``model`` with LoRA (Hu et al. 2021, "LoRA": W + (alpha/r) B A) and return the ``PeftModel``.

    * ``peft_args.peft_model_id`` set: that adapter is loaded trainable (``is_trainable=True``) and its
      own ``LoraConfig`` is used (the ``--lora_*`` flags are ignored, which is logged). With
      ``with_reference_adapter`` it is loaded a second time, frozen, as the reference
      (:func:`setup_reference_adapter`).
    * otherwise a fresh adapter: ``r``, ``alpha``, ``dropout``, ``target_modules`` resolved by
      :func:`resolve_target_modules` (``all-linear`` / ``ALL``, ``DEFAULT``, or module names).
    * 4-bit / 8-bit base weights: ``peft.prepare_model_for_kbit_training`` first (QLoRA, Dettmers et al. 2023).
    * an encoder–decoder model: task ``SEQ_2_SEQ_LM`` (peft's ``PeftModelForSeq2SeqLM``).
    * ``reward_head`` (a reward model, ``--loss rm``): task ``SEQ_CLS``, LoRA on the body only (``all-linear``
      leaves the head out) and the scalar head ``score`` trained fully (``modules_to_save``); a
      continued adapter must be such a reward-model adapter.

    Raises:
        ModelLoadError: ``model`` is already a ``PeftModel``, or the adapter directory is missing.
    """
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if _is_peft_model(model):
        raise ModelLoadError("apply_peft: the model already has peft adapters")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if peft_args.peft_model_id:
        if not Path(peft_args.peft_model_id, "adapter_config.json").is_file():
            raise ModelLoadError(f"--peft_model_id {peft_args.peft_model_id}: no adapter_config.json there")
        _check_adapter_task(peft_args.peft_model_id, reward_head)
        peft_model = PeftModel.from_pretrained(model, peft_args.peft_model_id, is_trainable=True,
                                               adapter_name=TRAIN_ADAPTER)
        cfg = peft_model.peft_config[TRAIN_ADAPTER]
        logger.info("Continuing adapter %s (r=%s, alpha=%s, targets=%s); --lora_* flags are ignored",
                    peft_args.peft_model_id, cfg.r, cfg.lora_alpha, cfg.target_modules)
        if with_reference_adapter:
            setup_reference_adapter(peft_model, peft_args.peft_model_id)
        return fuse_lora_dropout(peft_model)
    target_modules = resolve_target_modules(model, peft_args.lora_target_modules)
    if getattr(model.config, "vision_config", None) is not None:  # the language model's layers (models_vision)
        from .models_vision import vision_lora_targets

        target_modules = vision_lora_targets(model, target_modules)
    task_type = "SEQ_CLS" if reward_head else "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) \
        else "CAUSAL_LM"
    config = LoraConfig(r=peft_args.lora_r, lora_alpha=peft_args.lora_alpha, lora_dropout=peft_args.lora_dropout,
                        target_modules=target_modules, task_type=task_type,
                        bias="none", modules_to_save=["score"] if reward_head else None)
    return fuse_lora_dropout(get_peft_model(model, config, adapter_name=TRAIN_ADAPTER))


# Output projections of attention blocks (not part of ms-swift's DEFAULT targets, which are the
# query/key/value projections: swift 2.x lists q_proj, k_proj, v_proj for Llama, c_attn for Qwen).
_ATTENTION_OUTPUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o", "proj", "out")


def attention_input_projections(model: nn.Module) -> list[str]:
    """Leaf names of the query/key/value projections of ``model``'s attention blocks: the linear
    (or transformers ``Conv1D``) children of modules whose class name contains ``Attention``,
    except the output projection. Llama: ``["k_proj", "q_proj", "v_proj"]``; GPT-2: ``["c_attn"]``.

    Raises:
        ModelLoadError: no such layer was found.
    """
    from transformers.pytorch_utils import Conv1D

    names: set[str] = set()
    for module in model.modules():
        if "attention" not in type(module).__name__.lower():
            continue
        for child_name, child in module.named_children():
            if isinstance(child, (nn.Linear, Conv1D)) and child_name not in _ATTENTION_OUTPUT_NAMES:
                names.add(child_name)
    if not names:
        raise ModelLoadError(f"--lora_target_modules DEFAULT: found no attention projection layers in "
                             f"{type(model).__name__}; name the modules (e.g. q_proj v_proj) or use all-linear")
    return sorted(names)


def resolve_target_modules(model: nn.Module, names) -> str | list[str]:
    """What peft's ``LoraConfig(target_modules=...)`` gets for ``--lora_target_modules names``.

    * ``all-linear`` or ``ALL`` (ms-swift): peft's ``"all-linear"``, every linear layer except the
      output head; it cannot be combined with other names;
    * ``DEFAULT`` or ``AUTO`` (ms-swift): the attention's query/key/value projections
      (:func:`attention_input_projections`), plus any other names given; for an encoder–decoder
      model (T5, BART ...) the query and value projections of every attention (encoder, decoder,
      cross-attention: T5 ``q v``, BART ``q_proj v_proj``), peft's and the LoRA paper's choice
      (:func:`encoder_decoder_default_targets`);
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
            encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
            found = encoder_decoder_default_targets(model) if encoder_decoder else attention_input_projections(model)
            logger.info("--lora_target_modules %s: the attention projections %s", name, " ".join(found))
            resolved += found
        else:
            resolved.append(name)
    return list(dict.fromkeys(resolved))


def encoder_decoder_default_targets(model: nn.Module) -> list[str]:
    """``DEFAULT`` LoRA targets of an encoder–decoder model: peft's per-architecture list (T5 / mT5
    ``q v``, BART ``q_proj v_proj``), else the query and value projections among
    :func:`attention_input_projections` (Hu et al. 2021, "LoRA", Sec. 7.1: W_q and W_v)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    known = PEFT_DEFAULTS.get(getattr(model.config, "model_type", None))
    if known:
        return list(known)
    found = attention_input_projections(model)
    return [n for n in found if n in ("q", "v", "q_proj", "v_proj")] or found


def _check_adapter_task(adapter_dir: str, reward_head: bool) -> None:
    """A continued adapter must be of the kind being trained (reward model: ``SEQ_CLS``; else not)."""
    import json

    task = json.loads(Path(adapter_dir, "adapter_config.json").read_text()).get("task_type")
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
    if not _is_peft_model(model):
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
    if not _is_peft_model(model):
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
    if not _is_peft_model(model):
        raise ModelLoadError("save_adapter needs a PeftModel; use model.save_pretrained for full models")
    output_dir = Path(output_dir)
    model.save_pretrained(str(output_dir), selected_adapters=[TRAIN_ADAPTER])
    return output_dir
