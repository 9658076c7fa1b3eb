"""LLaMA-Factory's ``dataset_info.json``: data sets named in a config, resolved as LLaMA-Factory does.

A LLaMA-Factory config names its data (``dataset: dpo_en_demo,kto_en_demo``, ``eval_dataset``) by
entries of ``<dataset_dir>/dataset_info.json`` (``dataset_dir`` default ``data``). An entry says
where the records are and how they are spelled (read from LLaMA-Factory ``data/README.md`` and
``src/llamafactory/data/parser.py``, ``loader.py``; not copied):

* where: ``file_name`` (a file, or a folder whose files are all read, relative to ``dataset_dir``),
  ``hf_hub_url`` (a Hub data set, or a local snapshot folder of it at that path, with ``subset``,
  ``folder`` and ``split``, default ``train``; offline without a snapshot: refused), ``ms_hub_url`` / ``om_hub_url``
  (ModelScope / Modelers: refused, preftune reads local files and the Hugging Face Hub),
  ``script_url`` / ``cloud_file_name`` (refused);
* how: ``formatting`` (``alpaca``, the default, ``sharegpt`` or ``openai``), ``ranking`` (paired
  preference data: ``chosen`` / ``rejected``), ``columns`` (the file's name of each role:
  ``prompt`` / ``query`` / ``response`` / ``history`` / ``system`` / ``images`` for alpaca,
  ``messages`` / ``system`` / ``images`` for sharegpt, and ``chosen``, ``rejected``, ``kto_tag``), and
  for sharegpt ``tags`` (``role_tag``, ``content_tag``, ``user_tag``, ``assistant_tag``,
  ``system_tag``, ``observation_tag``, ``function_tag``) with LLaMA-Factory's defaults (``from`` /
  ``value`` / ``human`` / ``gpt`` / ``system``; ``messages`` is ``conversations``, alpaca's
  ``prompt`` / ``query`` / ``response`` are ``instruction`` / ``input`` / ``output``); ``num_samples``
  (that many records drawn at random, the file repeated when it is shorter).

:func:`resolve` turns names into ``--dataset`` specs (``<dataset_info.json>::<name>``) and the record
format each one has; :func:`load_entry` (called by :func:`preftune.data.loading.load_raw` for such a
spec) reads the records and respells them in the field names preftune's formats read: ``sharegpt``
(``conversations`` of ``{from, value}`` turns, ``chosen`` / ``rejected``), ``alpaca``
(``instruction`` / ``input`` / ``chosen`` / ``rejected``) or ``unpaired`` (KTO: a conversation and a
``label``, from the ``kto_tag`` column). Columns an entry does not name are not read, as in
LLaMA-Factory.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

from preftune.errors import ConfigError, DataError

INFO_FILE = "dataset_info.json"
MARK = "::"  # <dataset_dir>/dataset_info.json::<name>, or <file>::llamafactory_v1
V1_NAME = "llamafactory_v1"
V1_FIELDS = ("chosen_messages", "rejected_messages")
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None,
                  "images": None, "chosen": None, "rejected": None, "kto_tag": None}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": None, "images": None, "chosen": None, "rejected": None,
                    "kto_tag": None}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system", "observation_tag": "observation", "function_tag": "function_call"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "system_tag": "system", "observation_tag": "tool", "function_tag": "function"}
_CANONICAL = {"user_tag": "human", "assistant_tag": "gpt", "system_tag": "system", "observation_tag": "observation",
              "function_tag": "function_call"}
UNSUPPORTED_KEYS = ("tools", "videos", "audios")


@dataclass(frozen=True)
class Resolved:
    """One data set of a config: the ``--dataset`` spec, its preftune record format and a log line."""

    name: str
    spec: str
    format: str
    note: str


def v1_spec(path: str) -> str:
    """A local data file of LLaMA-Factory v1's own format (its first record has ``chosen_messages`` and
    ``rejected_messages``) → ``<path>::llamafactory_v1`` (respelled at loading); any other path as it is."""
    spec, hash_, count = path.partition("#")
    if not os.path.isfile(spec):
        return path
    try:
        with open(spec, encoding="utf-8") as handle:
            head = handle.read(65536).lstrip()
    except (OSError, UnicodeDecodeError):
        return path
    first = head.split("\n", 1)[0] if not head.startswith("[") else head
    if all(f'"{field}"' in first for field in V1_FIELDS):
        return f"{spec}{MARK}{V1_NAME}{hash_}{count}"
    return path


def read_info(dataset_dir: str, source: str) -> dict:
    """``<dataset_dir>/dataset_info.json`` as a dict. Raises ConfigError: missing, not JSON, not a mapping."""
    path = os.path.join(dataset_dir, INFO_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{source}: dataset_dir {dataset_dir!r} has no {INFO_FILE} ({path} not found); "
                          "LLaMA-Factory names its data sets there (set dataset_dir to the folder that holds it)")
    try:
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read ({err})") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{path}: expected a JSON object of data set entries")
    return info


def _entry(info: dict, name: str, where: str) -> dict:
    if name not in info:
        import difflib

        hint = difflib.get_close_matches(name, list(info), n=1)
        raise ConfigError(f"{where}: no data set {name!r} in it" + (f"; did you mean {hint[0]!r}?" if hint else "")
                          + f" ({len(info)} entries)")
    entry = info[name]
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: entry {name!r} is not an object")
    return entry


def _format(entry: dict, name: str, where: str, stage: str) -> str:
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise ConfigError(f"{where}, {name}: formatting {formatting!r} is not one of alpaca, sharegpt, openai")
    columns = entry.get("columns") or {}
    for key in UNSUPPORTED_KEYS:
        if columns.get(key):
            raise ConfigError(f"{where}, {name}: columns.{key} ({columns[key]!r}): preftune trains on text and images; "
                              f"{key} are not supported")
    if columns.get("kto_tag"):
        return "unpaired"
    if entry.get("ranking"):
        return "alpaca" if formatting == "alpaca" else "sharegpt"
    raise ConfigError(f"{where}, {name}: not preference data (no \"ranking\": true and no kto_tag column): an SFT or "
                      f"pre-training set, which stage {stage} cannot train on")


def _location(entry: dict, name: str, dataset_dir: str, where: str) -> tuple[str, str]:
    """``("file", path)`` or ``("hub", id[:split])``. Raises ConfigError for sources preftune cannot read."""
    if entry.get("ms_hub_url") and not entry.get("hf_hub_url"):
        raise ConfigError(f"{where}, {name}: ms_hub_url {entry['ms_hub_url']!r} is a ModelScope data set; preftune "
                          "reads local files and the Hugging Face Hub: download it and give its file as file_name")
    if entry.get("om_hub_url") and not entry.get("hf_hub_url"):
        raise ConfigError(f"{where}, {name}: om_hub_url (Modelers hub) is not supported; give file_name")
    if entry.get("hf_hub_url"):
        repo = entry["hf_hub_url"]
        local = next((p for p in (repo, os.path.join(os.path.dirname(where), repo)) if os.path.isdir(p)), None)
        if local is None and (os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
                              or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0")):
            raise ConfigError(f"{where}, {name}: hf_hub_url {repo!r} is on the Hugging Face Hub and this run is "
                              "offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); download it into dataset_dir and give "
                              "file_name instead")
        return "hub", local or repo
    for key in ("script_url", "cloud_file_name"):
        if entry.get(key):
            raise ConfigError(f"{where}, {name}: {key} is not supported; give the data as file_name")
    if not entry.get("file_name"):
        raise ConfigError(f"{where}, {name}: the entry has no file_name (nor hf_hub_url)")
    path = os.path.join(os.path.dirname(where), entry["file_name"])
    if not os.path.exists(path):
        raise ConfigError(f"{where}, {name}: file_name {entry['file_name']!r}: {path} not found")
    return "file", path


def resolve(names: Any, dataset_dir: str, source: str, stage: str, limit: Optional[int] = None) -> list[Resolved]:
    """Data set names of a LLaMA-Factory config (a list, or one comma-separated string) → :class:`Resolved`.

    ``limit``: the config's ``max_samples`` (the first N records of each data set). Raises
    ConfigError naming the config, the ``dataset_info.json`` and the entry for a missing name, a
    source preftune cannot read (ModelScope, scripts, a Hub set offline) or non-preference data.
    """
    items = names if isinstance(names, list) else str(names).split(",")
    items = [str(n).strip() for n in items if str(n).strip()]
    info = read_info(dataset_dir, source)
    where = os.path.join(dataset_dir, INFO_FILE)
    out = []
    for name in items:
        entry = _entry(info, name, where)
        fmt = _format(entry, name, where, stage)
        kind, location = _location(entry, name, dataset_dir, where)
        spec = f"{where}{MARK}{name}" + (f"#{limit}" if limit else "")
        sampled = f", {entry['num_samples']} drawn at random" if entry.get("num_samples") else ""
        out.append(Resolved(name, spec, fmt, f"dataset {name}: {where} → {location} ({kind}, format {fmt}{sampled})"))
    return out


def load_entry(path: str, limit: Optional[int], read: Callable[[str], Any], seed: int = 0) -> tuple:
    """Records of the entry ``path`` (``<dataset_info.json>::<name>``), respelled for preftune's formats.

    ``read(file_or_hub_id)`` returns an object with ``records`` and ``locations`` (preftune's reader).
    Returns ``(source, records, locations, base_dir)``. Raises DataError naming the entry and record.
    """
    info_path, _, name = path.partition(MARK)
    if name == V1_NAME:  # a v1 data file: chosen_messages / rejected_messages
        raw = read(info_path)
        records = [_respell_v1(r, f"{info_path}, {loc}") for r, loc in zip(raw.records, raw.locations)]
        locations = list(raw.locations)
        if limit is not None:
            records, locations = records[:limit], locations[:limit]
        return info_path, records, locations, os.path.dirname(os.path.abspath(info_path))
    dataset_dir = os.path.dirname(info_path)
    try:
        info = read_info(dataset_dir, info_path)
        entry = _entry(info, name, info_path)
        fmt = _format(entry, name, info_path, "")
        kind, location = _location(entry, name, dataset_dir, info_path)
    except ConfigError as err:
        raise DataError(str(err)) from None
    files = [location]
    if kind == "hub":
        read = _hub_reader(entry, name, info_path)
    elif os.path.isdir(location):
        files = sorted(os.path.join(location, f) for f in os.listdir(location) if not f.startswith("."))
    records: list[dict] = []
    locations: list[str] = []
    for file in files:
        raw = read(file)
        records += raw.records
        locations += [f"{os.path.basename(file)} {loc}" if len(files) > 1 else loc for loc in raw.locations]
    if entry.get("num_samples"):
        count = int(entry["num_samples"])
        order = random.Random(seed).sample(range(len(records)), min(count, len(records)))
        order += [random.Random(seed + 1).randrange(len(records)) for _ in range(count - len(order))]
        records, locations = [records[i] for i in order], [locations[i] for i in order]
    if limit is not None:
        records, locations = records[:limit], locations[:limit]
    source = f"{name} ({location})"
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    convert = _respell_alpaca if entry.get("formatting", "alpaca") == "alpaca" else _respell_sharegpt
    out = [convert(record, columns, tags, fmt, entry.get("formatting"), f"{source}, {loc}")
           for record, loc in zip(records, locations)]
    return source, out, locations, os.path.abspath(dataset_dir or ".") if kind == "file" else None


def _hub_reader(entry: dict, name: str, where: str) -> Callable[[str], Any]:
    """A reader of a Hub data set (or a local snapshot folder of one) with the entry's ``subset``
    (configuration), ``folder`` (data_dir) and ``split``, through :func:`datasets.load_dataset`."""

    def read(repo: str) -> Any:
        import datasets

        try:
            table = datasets.load_dataset(repo, name=entry.get("subset"), data_dir=entry.get("folder"),
                                          split=entry.get("split", "train"))
        except Exception as err:  # network, missing repo / subset / split: all end here, with the entry named
            raise DataError(f"{where}, {name}: loading {repo!r} (subset {entry.get('subset')}, split "
                            f"{entry.get('split', 'train')}) failed ({type(err).__name__}: {err})") from None
        records = table.to_list()
        return SimpleNamespace(records=records, locations=[f"record {i}" for i in range(1, len(records) + 1)])

    return read


def _v1_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"{where}: expected a string or a list of content blocks, got {type(content).__name__}")
    texts = []
    for index, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text":
            raise DataError(f"{where}[{index}]: a {kind!r} block; preftune reads the text blocks of v1 data "
                            "({\"type\": \"text\", \"value\": ...}) only")
        texts.append(block.get("value", block.get("text")))
    return "".join(str(t) for t in texts)


def _respell_v1(record: dict, where: str) -> dict:
    """A v1 record (``chosen_messages`` / ``rejected_messages``: role, content blocks, loss_weight) →
    ms-swift 3.x spelling (``messages`` + ``rejected_messages``, text contents), which preftune's
    ``swift3`` format reads (one shared prompt, the replies after the last user message)."""
    out = {}
    for field, name in zip(V1_FIELDS, ("messages", "rejected_messages")):
        messages = record.get(field)
        if not isinstance(messages, list):
            raise DataError(f"{where}: {field}: expected a list of messages, got {type(messages).__name__}")
        out[name] = [{"role": m.get("role"), "content": _v1_text(m.get("content"), f"{where}: {field}[{i}].content")}
                     if isinstance(m, dict) else m for i, m in enumerate(messages)]
    return out


def _column(columns: dict, defaults: dict, role: str) -> Optional[str]:
    return columns.get(role, defaults.get(role))


def _respell_alpaca(record: dict, columns: dict, tags: dict, fmt: str, formatting: str, where: str) -> dict:
    def get(role: str) -> Any:
        column = _column(columns, ALPACA_COLUMNS, role)
        return record.get(column) if column else None

    if fmt != "unpaired":
        out = {"instruction": get("prompt"), "input": get("query") or None, "chosen": get("chosen"),
               "rejected": get("rejected"), "system": get("system"), "history": get("history"),
               "images": get("images")}
        return {k: v for k, v in out.items() if v is not None}
    turns = [{"from": "system", "value": get("system")}] if get("system") else []
    for query, response in get("history") or []:
        turns += [{"from": "human", "value": query}, {"from": "gpt", "value": response}]
    prompt = "\n".join(part for part in (get("prompt"), get("query")) if part)
    turns += [{"from": "human", "value": prompt}, {"from": "gpt", "value": get("response")}]
    return {"conversations": turns, "label": get("kto_tag"), **({"images": get("images")} if get("images") else {})}


def _respell_sharegpt(record: dict, columns: dict, tags: dict, fmt: str, formatting: str, where: str) -> dict:
    base = OPENAI_TAGS if formatting == "openai" else SHAREGPT_TAGS
    tag = {key: tags.get(key, base[key]) for key in base}
    roles = {tag[key]: _CANONICAL[key] for key in _CANONICAL}

    def turn(value: Any, field: str) -> Any:
        if not isinstance(value, dict):
            return value  # a plain string reply, or a malformed turn the format's checks name
        role = value.get(tag["role_tag"])
        if role not in roles:
            raise DataError(f"{where}: {field}: role {role!r} is not one of this entry's tags "
                            f"({', '.join(f'{k}={v!r}' for k, v in tag.items() if k != 'content_tag')})")
        return {"from": roles[role], "value": value.get(tag["content_tag"])}

    column = _column(columns, SHAREGPT_COLUMNS, "messages")
    messages = record.get(column)
    if not isinstance(messages, list):
        raise DataError(f"{where}: {column}: expected a list of turns (the entry's messages column), "
                        f"got {type(messages).__name__}")
    out: dict = {"conversations": [turn(m, f"{column}[{i}]") for i, m in enumerate(messages)]}
    for role in ("system", "images"):
        name = _column(columns, SHAREGPT_COLUMNS, role)
        if name and record.get(name) is not None:
            out[role] = record[name]
    if fmt == "unpaired":
        out["label"] = record.get(_column(columns, SHAREGPT_COLUMNS, "kto_tag"))
        return out
    for side in ("chosen", "rejected"):
        name = _column(columns, SHAREGPT_COLUMNS, side) or side
        out[side] = turn(record.get(name), name)
    return out
