"""Preference data as ms-swift and LLaMA-Factory write it, converted to TRL's conversational form.

Each converter takes one record and returns ``{"prompt": [messages], "chosen": [assistant
messages], "rejected": [assistant messages]}`` (plus ``"margin"`` where given), exactly what a TRL
conversational record holds, so the chat template is applied the same way at tokenisation.
Shapes read (from the ms-swift 3.x/4.x "Custom dataset" documentation and LLaMA-Factory's
``data/README.md`` and ``converter.py``, read in 2026):

* ``swift2`` (ms-swift 2.x, still read by 3.x/4.x): ``query``, ``response`` (chosen),
  ``rejected_response`` strings; optional ``system``; optional ``history`` =
  ``[[query, response], ...]`` earlier turns (a JSON string of it is parsed); optional ``images``.
* ``swift3`` (ms-swift 3.x/4.x): ``messages`` ending with the chosen reply: the prompt is every
  message up to and including the last ``user`` message, the chosen completion the (assistant)
  messages after it. The rejected side is ``rejected_response`` (a string, or a list of assistant
  messages, replacing everything after the last user message), or ``rejected_messages`` (a whole
  conversation; its messages up to the last user message must equal the prompt: preftune trains
  on a shared prompt), or only ``rejected_images`` (same text, other images). Optional ``system``
  (when ``messages`` has no system message), ``images``, ``rejected_images``, and a numeric
  ``margin`` (reward models), kept on the record as ``"margin"`` (float).
* ``sharegpt`` (LLaMA-Factory ranking, ORPO guides): ``conversations`` (or ``messages``) =
  ``[{"from": "system"|"human"|"gpt", "value": ...}]`` or the ``role``/``content`` spelling
  (``system``/``user``/``assistant``), an optional leading system turn, then user and assistant
  turns alternating, ending with a user turn; ``chosen`` / ``rejected`` as ``{"from": "gpt",
  "value": ...}`` (or ``{"role": "assistant", "content": ...}``) objects or plain strings;
  optional top-level ``system`` (used when there is no system turn); optional ``images``.
  Tool turns (``observation``, ``function_call``) are not supported (an error names the turn).
* ``alpaca`` (LLaMA-Factory / swift Alpaca ranking): ``instruction``, optional ``input`` (the user
  turn is ``instruction + "\\n" + input``, either one alone when the other is empty, as both
  projects do), ``chosen`` / ``rejected`` strings, optional ``system`` and ``history``
  (``[[query, response], ...]``), optional ``images``.

A blank ``system`` string counts as no system message (the chat template's default system
prompt, if it has one, then applies — as in both projects). Image fields are handled for every
format by :mod:`preftune.data.media`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .validate import Here, assistant, user

SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant",
                  "user": "user", "assistant": "assistant"}
UNSUPPORTED_TURNS = ("observation", "function_call", "function", "tool", "tool_call", "tool_response")


def _system(text: Any) -> list[dict]:
    return [{"role": "system", "content": text}] if text else []


def _turns(history: list[tuple[str, str]]) -> list[dict]:
    out = []
    for query, response in history:
        out += [user(query), assistant(response)]
    return out


def from_swift2(here: Here, record: dict) -> dict:
    """ms-swift 2.x query / response / rejected_response (see the module docstring)."""
    prompt = _system(here.optional_text(record, "system")) + _turns(here.history(record))
    prompt.append(user(here.text(record, "query")))
    return {"prompt": prompt, "chosen": [assistant(here.text(record, "response"))],
            "rejected": [assistant(here.text(record, "rejected_response"))]}


def _split_at_last_user(here: Here, name: str, messages: list[dict]) -> tuple[list[dict], list[dict]]:
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        raise here.fail(name, "no user message; the conversation must hold the user turn that the replies answer")
    reply = messages[last + 1:]
    if not reply:
        raise here.fail(name, "ends with a user message; it must end with the reply (assistant message)")
    for index in range(last + 1, len(messages)):
        if messages[index]["role"] != "assistant":
            raise here.fail(f"{name}[{index}].role", f"{messages[index]['role']!r} after the last user message; "
                            "the reply after it must be assistant messages")
    return messages[:last + 1], reply


def from_swift3(here: Here, record: dict) -> dict:
    """ms-swift 3.x/4.x messages + rejected_response / rejected_messages (see the module docstring)."""
    messages = here.messages(record, "messages")
    system = here.optional_text(record, "system")
    if system is not None:
        if messages[0]["role"] == "system":
            raise here.fail("system", "given both as a field and as the first message of 'messages'; keep one")
        messages = _system(system) + messages
    prompt, chosen = _split_at_last_user(here, "messages", messages)
    has_response, has_messages = record.get("rejected_response") is not None, record.get("rejected_messages") is not None
    if has_response and has_messages:
        raise here.fail("rejected_messages", "given together with 'rejected_response'; give one of them")
    if has_messages:
        other = here.messages(record, "rejected_messages")
        if system is not None and other[0]["role"] != "system":
            other = _system(system) + other
        other_prompt, rejected = _split_at_last_user(here, "rejected_messages", other)
        if other_prompt != prompt:
            raise here.fail("rejected_messages", "differs from 'messages' before the last user message; preftune "
                                                 "trains chosen and rejected on one shared prompt")
    elif has_response:
        value = record["rejected_response"]
        if isinstance(value, str):
            rejected = [assistant(here.text(record, "rejected_response"))]
        else:
            rejected = here.messages(record, "rejected_response", assistant_only=True)
    else:  # only rejected_images: the same reply, judged against other images
        rejected = [dict(m) for m in chosen]
    pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    margin = record.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise here.fail("margin", f"expected a number, got {type(margin).__name__}")
        pair["margin"] = float(margin)
    return pair


def _sharegpt_turn(here: Here, label: str, turn: Any, reply: bool = False) -> dict:
    if reply and isinstance(turn, str):
        return {"role": "assistant", "content": here.content(turn, label)}
    if not isinstance(turn, dict):
        raise here.fail(label, f"expected a {{from, value}} turn, got {type(turn).__name__}")
    role_key, content_key = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
    tag = turn.get(role_key)
    if tag in UNSUPPORTED_TURNS:
        raise here.fail(f"{label}.{role_key}", f"{tag!r} turns (tool use) are not supported")
    if tag not in SHAREGPT_ROLES:
        raise here.fail(f"{label}.{role_key}", f"{tag!r} is not a valid {role_key} "
                                               f"({', '.join(SHAREGPT_ROLES)})")
    role = SHAREGPT_ROLES[tag]
    return {"role": role, "content": here.content(turn.get(content_key), f"{label}.{content_key}",
                                                  allow_empty=role == "system")}


def from_sharegpt(here: Here, record: dict) -> dict:
    """LLaMA-Factory ShareGPT ranking (see the module docstring)."""
    name = "messages" if record.get("conversations") is None and record.get("messages") is not None else "conversations"
    turns = here.get(record, name)
    if not isinstance(turns, list) or not turns:
        raise here.fail(name, "expected a non-empty list of turns")
    messages = [_sharegpt_turn(here, f"{name}[{i}]", turn) for i, turn in enumerate(turns)]
    system = here.optional_text(record, "system")
    start = 1 if messages[0]["role"] == "system" else 0
    if start and system is not None and system != messages[0]["content"]:
        raise here.fail("system", f"differs from the system turn {name}[0]; keep one")
    prompt = messages if start else _system(system) + messages
    for index in range(start, len(messages)):
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        if messages[index]["role"] != expected:
            raise here.fail(f"{name}[{index}]", f"{messages[index]['role']!r} turn where a {expected!r} turn is due; "
                                                "turns alternate human, gpt, ... and end with a human turn")
    if prompt[-1]["role"] != "user":
        raise here.fail(name, "must end with a human (user) turn; chosen/rejected are the replies to it")
    pair = {"prompt": prompt}
    for side in ("chosen", "rejected"):
        message = _sharegpt_turn(here, side, record[side], reply=True)
        if message["role"] != "assistant":
            raise here.fail(side, f"a {message['role']!r} turn; chosen and rejected must be gpt (assistant) replies")
        pair[side] = [message]
    return pair


def from_alpaca(here: Here, record: dict) -> dict:
    """Alpaca ranking: instruction / input / chosen / rejected (see the module docstring)."""
    instruction = here.text(record, "instruction", allow_empty=True)
    extra = here.optional_text(record, "input")
    query = "\n".join(part for part in (instruction, extra) if part)
    if not query.strip():
        raise here.fail("instruction", "empty (and no input)")
    prompt = _system(here.optional_text(record, "system")) + _turns(here.history(record)) + [user(query)]
    return {"prompt": prompt, "chosen": [assistant(here.text(record, "chosen"))],
            "rejected": [assistant(here.text(record, "rejected"))]}


CONVERTERS: dict[str, Callable[[Here, dict], dict]] = {
    "swift2": from_swift2, "swift3": from_swift3, "sharegpt": from_sharegpt, "alpaca": from_alpaca}
DESCRIPTIONS = {
    "swift2": "ms-swift 2.x query/response/rejected_response",
    "swift3": "ms-swift 3.x/4.x messages + rejected_response/rejected_messages",
    "sharegpt": "LLaMA-Factory ShareGPT ranking",
    "alpaca": "Alpaca ranking (instruction/input/chosen/rejected)",
}
