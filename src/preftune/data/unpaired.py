"""Unpaired preference data (KTO): records with one completion and a desirable / undesirable label.

Record formats read (detected by :mod:`preftune.data.detect` as ``unpaired``):

* TRL's unpaired preference format: ``prompt``, ``completion`` (strings, or message lists with the
  completion as assistant messages) and a boolean ``label`` (``True``: desirable).
* ms-swift's and LLaMA-Factory's KTO records: ``messages`` (or ``conversations``, ShareGPT's
  ``from``/``value`` spelling) ending with the assistant reply, and ``label`` (LLaMA-Factory's
  ``kto_tag`` column, renamed by its ``dataset_info.json`` or ``--columns kto_tag=label``). The
  prompt is every message up to the last user message, the completion the assistant messages after it.

A label of ``0`` / ``1`` is read as ``False`` / ``True``; any other value is an error naming the field.

The engine scores KTO examples in its pair layouts: an example is a :class:`TokenizedPair` whose
``chosen_ids`` are the completion and whose ``rejected_ids`` are the *KL partner*, another example's
completion scored after this example's prompt (the mismatched pair of the KTO paper's KL estimate,
Ethayarajh et al. 2024, arXiv 2402.01306, Sec. 4.1), so the prompt is run once for both in the
shared-prompt layout. :func:`kto_examples` builds them from tokenised data:

* paired data (prompt / chosen / rejected) is *unpaired* first as TRL's ``unpair_preference_dataset``
  does: in blocks of 1,000 pairs, every chosen completion (label True) then every rejected one
  (label False), each with its prompt;
* KL partners rotate the completions by one inside consecutive blocks of ``batch_size`` examples
  (TRL 1.16 ``KTOTrainer``: ``(x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})``); the partner is cut so
  that prompt + partner fits ``max_length`` (TRL's collator keeps the start of the sequence);
* without a KL term (``apo_zero_unpaired``) the partner slot holds the completion's last token
  only (one token of work, never read by the loss).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Optional

from preftune.types import TokenizedPair

from .ecosystems import SHAREGPT_ROLES, _split_at_last_user
from .validate import Here

logger = logging.getLogger("preftune.data")

UNPAIR_BLOCK = 1000  # datasets.map's default batch size, used by TRL's unpair_preference_dataset


def _label(here: Here, record: dict) -> bool:
    value = record.get("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise here.fail("label", f"expected true / false (desirable / undesirable completion), got {value!r}")


def _conversation(here: Here, record: dict) -> tuple[list[dict], list[dict]]:
    name = "messages" if record.get("messages") is not None else "conversations"
    turns = record[name]
    if not isinstance(turns, list) or not turns:
        raise here.fail(name, "expected a non-empty list of messages")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise here.fail(f"{name}[{index}]", f"expected a message object, got {type(turn).__name__}")
        role_key, content_key = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
        role = SHAREGPT_ROLES.get(turn.get(role_key))
        if role is None:
            raise here.fail(f"{name}[{index}].{role_key}", f"{turn.get(role_key)!r} is not one of "
                                                           f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": here.content(turn.get(content_key), f"{name}[{index}].{content_key}",
                                                               allow_empty=role == "system")})
    system = here.optional_text(record, "system")
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return _split_at_last_user(here, name, messages)


def from_unpaired(here: Here, record: dict) -> dict:
    """One unpaired record -> ``{"prompt", "chosen": completion, "rejected": completion, "label": bool}``
    (strings or message lists). ``rejected`` is a placeholder: :func:`kto_examples` replaces its tokens
    with the KL partner's. Raises :class:`~preftune.errors.DataError` naming the field."""
    label = _label(here, record)
    if record.get("prompt") is None:
        prompt, completion = _conversation(here, record)
    elif isinstance(record.get("prompt"), str):
        prompt, completion = here.text(record, "prompt"), here.text(record, "completion", allow_empty=True)
    else:
        prompt = here.messages(record, "prompt")
        if prompt[-1]["role"] == "assistant":
            raise here.fail("prompt", "ends with an assistant message; the prompt must end with the turn that the "
                                      "completion answers")
        completion = here.messages(record, "completion", assistant_only=True)
    return {"prompt": prompt, "chosen": completion, "rejected": completion, "label": label}


def _rejected_side(pair: TokenizedPair) -> TokenizedPair:
    """The undesirable example of a pair: the rejected completion after the rejected side's prompt (its own
    images and prompt tokens when the pair has ``rejected_images``, ms-swift's field)."""
    example = replace(pair, chosen_ids=list(pair.rejected_ids), ref_chosen_logps=None, ref_rejected_logps=None,
                      label=False)
    images = pair.images
    if images is not None and images.rejected_paths is not None:
        example.images = replace(images, paths=list(images.rejected_paths), rejected_paths=None,
                                 rejected_prompt_ids=None)
        example.prompt_ids = list(images.rejected_prompt_ids)
    return example


def unpair(pairs: list[TokenizedPair]) -> list[TokenizedPair]:
    """Paired examples -> unpaired ones, TRL's order: per block of :data:`UNPAIR_BLOCK` pairs, the chosen
    completions (label True) then the rejected ones (label False); examples already unpaired pass."""
    out: list[TokenizedPair] = []
    for start in range(0, len(pairs), UNPAIR_BLOCK):
        block = pairs[start:start + UNPAIR_BLOCK]
        if all(p.label is not None for p in block):
            out += block
            continue
        out += [replace(p, rejected_ids=list(p.chosen_ids), ref_chosen_logps=None, ref_rejected_logps=None,
                        label=True, images=None if p.images is None else replace(
                            p.images, rejected_paths=None, rejected_prompt_ids=None)) for p in block]
        out += [_rejected_side(p) for p in block]
    return out


def with_kl_partners(examples: list[TokenizedPair], batch_size: int, max_length: Optional[int],
                     kl: bool = True) -> list[TokenizedPair]:
    """Set every example's ``rejected_ids`` to its KL partner (see the module docstring).

    ``batch_size``: examples per block (the per-device train batch size, as in TRL); ``max_length``:
    the cap of prompt + partner (None: no cap). ``kl`` False: the partner is the last completion token.
    """
    out = []
    for start in range(0, len(examples), max(1, batch_size)):
        block = examples[start:start + max(1, batch_size)]
        for i, example in enumerate(block):
            partner = list(block[i - 1].chosen_ids) if kl else list(example.chosen_ids[-1:])
            if max_length is not None:
                partner = partner[:max(1, max_length - len(example.prompt_ids))]
            out.append(replace(example, rejected_ids=partner, ref_chosen_logps=None, ref_rejected_logps=None))
    return out


def balance(examples: Iterable[TokenizedPair]) -> tuple[int, int]:
    """``(desirable, undesirable)`` example counts."""
    labels = [bool(p.label) for p in examples]
    return sum(labels), len(labels) - sum(labels)


def weight_advice(desirable: int, undesirable: int, desirable_weight: float,
                  undesirable_weight: float) -> Optional[str]:
    """The KTO paper's advice on imbalanced data (Ethayarajh et al. 2024, Eq. 8: ``λ_D n_D / (λ_U n_U)``
    should lie in ``[1, 4/3]``), as TRL words it: None when the counts are equal or either weight is in
    its recommended range, else a sentence with both ranges."""
    n_d, n_u = max(desirable, 1), max(undesirable, 1)
    if n_d == n_u:
        return None
    d_low, d_high = round(n_u * undesirable_weight / n_d, 2), round(n_u * undesirable_weight / n_d * 1.33, 2)
    u_low, u_high = round(n_d * desirable_weight / n_u / 1.33, 2), round(n_d * desirable_weight / n_u, 2)
    if d_low <= desirable_weight <= d_high or u_low <= undesirable_weight <= u_high:
        return None
    return (f"{desirable} desirable and {undesirable} undesirable examples with desirable_weight {desirable_weight} "
            f"and undesirable_weight {undesirable_weight}: the KTO paper (Eq. 8) recommends EITHER desirable_weight "
            f"in [{d_low}, {d_high}] OR undesirable_weight in [{u_low}, {u_high}] (not both)")


def kto_examples(pairs: list[TokenizedPair], *, batch_size: int, max_length: Optional[int], kl: bool,
                 desirable_weight: float, undesirable_weight: float, label: str = "data",
                 say: Any = None) -> list[TokenizedPair]:
    """Tokenised data (paired, unpaired or both) -> KTO examples with KL partners, and one report line:
    how many examples were made from how many pairs, desirable / undesirable, and the weight advice
    (:func:`weight_advice`, logged as a warning). ``say``: a callable taking the report line (None: log it)."""
    paired = sum(1 for p in pairs if p.label is None)
    examples = with_kl_partners(unpair(pairs), batch_size, max_length, kl)
    desirable, undesirable = balance(examples)
    line = (f"{label}: {len(examples)} KTO examples ({desirable} desirable, {undesirable} undesirable"
            + (f"; {2 * paired} made from {paired} pairs, chosen desirable and rejected undesirable" if paired else "")
            + (f"; KL term from each example's prompt with the completion of its neighbour in blocks of {batch_size}"
               if kl else "; no KL term") + ")")
    (say or logger.info)(line)
    if not desirable or not undesirable:
        logger.warning("%s: every KTO example is %s; KTO learns from both kinds", label,
                       "desirable" if desirable else "undesirable")
    advice = weight_advice(desirable, undesirable, desirable_weight, undesirable_weight)
    if advice and label == "data":
        logger.warning("data: %s", advice)
    return examples


def prepare_kto(data: Any, *, kl: bool, batch_size: int, max_length: Optional[int], desirable_weight: float,
                undesirable_weight: float) -> list[str]:
    """Turn the tokenised training and eval data of a run (a :class:`~preftune.data.pipeline.PreferenceData`;
    ``eval`` a list, a dict of named lists or None) into KTO examples in place (:func:`kto_examples`,
    eval sets with the training ``batch_size`` as TRL does); returns the report lines.

    ``batch_size`` 1 (LLaMA-Factory's and ms-swift's KTO examples use it; TRL refuses it because its
    rotation would make each example its own KL partner): partners rotate within blocks of 2, so every
    partner is another example's completion and each step's KL estimate rests on one mismatched pair
    (a warning says so).
    """
    if kl and batch_size < 2:
        logger.warning("data: --loss kto with --per_device_train_batch_size %d: each example's KL partner is the "
                       "completion of its neighbour in blocks of 2 examples, so each step's KL estimate rests on %d "
                       "mismatched pair(s); a batch of 4 or more estimates it better", batch_size, batch_size)
        batch_size = 2
    lines: list[str] = []
    options = dict(batch_size=batch_size, max_length=max_length, kl=kl, desirable_weight=desirable_weight,
                   undesirable_weight=undesirable_weight, say=lines.append)
    kept = getattr(data.train, "without_rejected", ())
    data.train = type(data.train)(kto_examples(data.train, label="data", **options))
    if kept:
        data.train.without_rejected = kept
    if isinstance(data.eval, dict):
        data.eval = {name: kto_examples(pairs, label=f"eval data ({name})", **options) for name, pairs in data.eval.items()}
    elif data.eval is not None:
        data.eval = kto_examples(data.eval, label="eval data", **options)
    for line in lines:
        logger.info(line)
    data.report = "\n".join([data.report, *lines]) if getattr(data, "report", None) else "\n".join(lines)
    return lines
