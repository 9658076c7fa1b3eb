"""Checks of one record's fields, with errors that name file, record and field.

:class:`Here` is bound to one record's position; every converter (:mod:`.formats`,
:mod:`.ecosystems`) reads fields through it, so a bad value is always reported as
``"<file>, <record>, field '<name>': <problem>"`` (:func:`preftune.data.errors.where`).

Message content may be a string or, as in TRL's vision format, a list of parts
``{"type": "text", "text": ...}`` / ``{"type": "image", ...}``: a list of text parts only is joined
into one string (so text models see plain strings); a list holding image parts is kept as is and
its image parts are counted in :attr:`Here.image_parts` (the record must then carry ``images``).
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from typing import Any, Optional

from .errors import DataError, where

ROLES = ("system", "user", "assistant", "tool")
# roles a completion may hold: (first message, later messages)
COMPLETION_ROLES = {False: ("assistant",), True: ("assistant", "tool")}
# apply_chat_template keywords that preftune's rendering sets (data/render.py): not a record's to change
RESERVED_TEMPLATE_KEYS = ("conversation", "tokenize", "add_generation_prompt", "continue_final_message", "return_dict",
                          "return_tensors", "padding", "truncation", "max_length", "return_assistant_tokens_mask")


@dataclass
class Here:
    """Validation helpers bound to one record: ``source`` (file), ``location`` (``line 7``),
    ``fmt`` (the format it is held to) and ``first`` (where that format was detected)."""

    source: str
    location: str
    fmt: str
    first: str
    image_parts: int = 0

    def fail(self, name: str, problem: str) -> DataError:
        """A :class:`DataError` for field ``name`` of this record."""
        return DataError(f"{where(self.source, self.location, name)}: {problem}")

    def get(self, record: dict, name: str) -> Any:
        """The value of ``name``; missing or None is an error."""
        if record.get(name) is None:
            raise self.fail(name, "missing")
        return record[name]

    def text(self, record: dict, name: str, value: Any = None, *, allow_empty: bool = False) -> str:
        """A non-empty string field (``value`` given: check that value, reported as field ``name``)."""
        value = self.get(record, name) if value is None else value
        if not isinstance(value, str):
            raise self.fail(name, f"expected a string ({self.fmt} format, detected from {self.first}), "
                                  f"got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise self.fail(name, "empty")
        return self.unicode(name, value)

    def unicode(self, name: str, value: str) -> str:
        """``value`` if it is valid Unicode (encodable as UTF-8); a lone surrogate such as ``"\\ud800"``
        (a JSON escape that is not a character) is an error naming the field."""
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise self.fail(name, f"invalid Unicode: a lone surrogate {value[err.start]!r} at character "
                                  f"{err.start} (not a character; fix the \\u escape)") from None
        return value

    def optional_text(self, record: dict, name: str) -> Optional[str]:
        """A string field that may be absent; absent, None or blank gives None."""
        value = record.get(name)
        if value is None:
            return None
        value = self.text(record, name, value, allow_empty=True)
        return value if value.strip() else None

    def history(self, record: dict, name: str = "history") -> list[tuple[str, str]]:
        """``[[query, response], ...]`` (swift / Alpaca); a JSON or Python-literal string of that
        list (CSV files) is parsed. Absent or None gives ``[]``."""
        value = record.get(name)
        if value is None:
            return []
        if isinstance(value, str):
            value = _parse_literal(value)
            if value is None:
                raise self.fail(name, "a string that is not a JSON list of [query, response] pairs")
        if not isinstance(value, (list, tuple)):
            raise self.fail(name, f"expected a list of [query, response] pairs, got {type(value).__name__}")
        turns = []
        for index, turn in enumerate(value):
            label = f"{name}[{index}]"
            if not isinstance(turn, (list, tuple)) or len(turn) != 2:
                raise self.fail(label, f"expected a [query, response] pair, got {turn!r:.60}")
            turns.append((self.text(record, label + "[0]", turn[0]), self.text(record, label + "[1]", turn[1])))
        return turns

    def messages(self, record: dict, name: str, assistant_only: bool = False, value: Any = None) -> list[dict]:
        """A non-empty list of ``{role, content}`` messages (roles :data:`ROLES`).

        Every other key of a message (``tool_calls``, ``name``, ``tool_call_id``, ``reasoning_content`` ...)
        is kept as given, for the chat template (as TRL passes messages to it). An assistant message with
        ``tool_calls`` (a non-empty list) may have no content (None or absent, kept as given); a ``tool``
        result and a system message may be empty.
        ``assistant_only`` (a completion): the messages must be the model's turn, assistant messages
        and the ``tool`` results of its calls, starting with an assistant message (TRL's tool-call
        trajectories: call, result, answer).
        """
        value = self.get(record, name) if value is None else value
        if not isinstance(value, list):
            raise self.fail(name, f"expected a list of messages ({self.fmt} format, detected from {self.first}), "
                                  f"got {type(value).__name__}")
        if not value:
            raise self.fail(name, "empty message list")
        out = []
        for index, message in enumerate(value):
            label = f"{name}[{index}]"
            if not isinstance(message, dict):
                raise self.fail(label, f"expected a {{role, content}} message, got {type(message).__name__}")
            role = message.get("role")
            if role not in ROLES:
                raise self.fail(label + ".role", f"{role!r} is not a valid role ({', '.join(ROLES)})")
            if assistant_only and role not in COMPLETION_ROLES[index > 0]:
                raise self.fail(label + ".role", f"{role!r}: completions must be assistant messages (and the 'tool' "
                                                 "results of its calls after the first)")
            calls = self._tool_calls(message, label, role)
            out.append(dict(message))
            if not (calls and message.get("content") is None):
                out[-1]["content"] = self.content(message.get("content"), label + ".content",
                                                  allow_empty=role in ("system", "tool") or bool(calls))
        return out

    def _tool_calls(self, message: dict, label: str, role: str) -> list:
        """The message's ``tool_calls`` (``[]`` when absent or None); only an assistant message makes calls,
        each a dict (``{"type": "function", "function": {"name", "arguments"}}`` as TRL / transformers write them)."""
        calls = message.get("tool_calls")
        if calls is None:
            return []
        if not isinstance(calls, list) or not all(isinstance(call, dict) for call in calls):
            raise self.fail(label + ".tool_calls", f"expected a list of tool-call objects, got {calls!r:.60}")
        if calls and role != "assistant":
            raise self.fail(label + ".tool_calls", f"tool calls on a {role!r} message; only assistant messages make them")
        return calls

    def template_args(self, record: dict) -> dict:
        """The record's ``tools`` and ``chat_template_kwargs``, checked, as the normalised record keeps them.

        ``tools``: a list of tool schemas (dicts, e.g. ``transformers.utils.get_json_schema`` output) or a
        JSON string of one (TRL reads both); passed to the chat template as ``tools=``.
        ``chat_template_kwargs``: a dict (or a JSON string of one) of extra template variables for this
        record, passed to ``apply_chat_template`` as keywords (TRL 1.16's per-row column); the keywords
        preftune sets itself (:data:`RESERVED_TEMPLATE_KEYS`) are refused. Absent, None or empty: left out.
        Raises :class:`DataError` (file, record, field) for any other value.
        """
        out = {}
        tools = record.get("tools")
        if tools is not None:
            if isinstance(tools, str):
                tools = _parse_literal(tools) if tools.strip() else []
            if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
                raise self.fail("tools", f"expected a list of tool schemas (objects) or a JSON string of one, got "
                                         f"{record['tools']!r:.60}")
            if tools:
                out["tools"] = tools
        kwargs = record.get("chat_template_kwargs")
        if kwargs is not None:
            if isinstance(kwargs, str):
                kwargs = _parse_literal(kwargs) if kwargs.strip() else {}
            if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
                raise self.fail("chat_template_kwargs", f"expected an object of template variables, got "
                                                        f"{record['chat_template_kwargs']!r:.60}")
            for key in kwargs:
                if key in RESERVED_TEMPLATE_KEYS:
                    raise self.fail(f"chat_template_kwargs.{key}", "set by preftune when it renders the prompt and "
                                                                   "the conversation; leave it out")
            if kwargs:
                out["chat_template_kwargs"] = dict(kwargs)
        return out

    def content(self, content: Any, label: str, allow_empty: bool = False) -> Any:
        """A message's content: a string, or a list of text / image parts (see the module docstring)."""
        if content is None:
            raise self.fail(label, "missing")
        if isinstance(content, list):
            return self._parts(content, label, allow_empty)
        if not isinstance(content, str):
            raise self.fail(label, f"expected a string or a list of content parts, got {type(content).__name__}")
        if not allow_empty and not content.strip():
            raise self.fail(label, "empty")
        return self.unicode(label, content)

    def _parts(self, parts: list, label: str, allow_empty: bool) -> Any:
        images = 0
        texts = []
        for index, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise self.fail(f"{label}[{index}].text", "expected a string")
                texts.append(self.unicode(f"{label}[{index}].text", part["text"]))
            elif kind == "image":
                images += 1
            else:
                raise self.fail(f"{label}[{index}]", f"expected a {{'type': 'text' | 'image'}} part, got {part!r:.60}")
        if images:
            self.image_parts += images
            return [dict(part) for part in parts]
        text = "".join(texts)
        if not allow_empty and not text.strip():
            raise self.fail(label, "empty")
        return text


def _parse_literal(text: str) -> Any:
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return None


def user(content: Any) -> dict:
    """``{"role": "user", "content": content}``."""
    return {"role": "user", "content": content}


def assistant(content: Any) -> dict:
    """``{"role": "assistant", "content": content}``."""
    return {"role": "assistant", "content": content}
