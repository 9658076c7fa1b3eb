"""Reward models after training: open one, score a file with it.

``preftune score --adapter DIR --dataset F --output scores.jsonl`` writes the reward of every
chosen and rejected completion of a preference file (any format the trainer reads), one JSON line
per record in file order, ``{"index", "id"?, "chosen_reward", "rejected_reward"}``; a file of
``{"prompt", "completions": [...]}`` records (best-of-n candidates) gets ``{"index", "id"?,
"rewards": [...], "best"}``. Records the tokeniser drops (their completion would be empty after
truncation) get a line too, with ``null`` rewards and ``"skipped"``: nothing disappears silently.

The reward of a sequence is the value head at its last non-pad token, computed by the engine
(the value-head kind's ``score``): the same numbers as transformers'
``AutoModelForSequenceClassification`` on ``prompt + completion``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from preftune.errors import ConfigError, ModelLoadError
from preftune.types import TokenizedPair

logger = logging.getLogger("preftune.score")

# --------------------------------------------------------------------------------------------
# Opening reward models (saving the value head: the value-head kind's ``save_extras``)
# --------------------------------------------------------------------------------------------
def adapter_task(path: str | Path) -> Optional[str]:
    """``task_type`` of the peft adapter in ``path`` (None when ``path`` holds no adapter)."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("task_type") or "?"


def _trained_base(model_args, path: Path):
    """``model_args``, with the base model of the run that wrote ``path`` when none is given."""
    if model_args.model_name_or_path is not None:
        return model_args
    config = path / "preftune_config.yaml"
    if config.is_file():
        import yaml

        base = (yaml.safe_load(config.read_text()) or {}).get("model_name_or_path")
        if base:
            return dataclasses.replace(model_args, model_name_or_path=base)
    return model_args


def open_reward_model(model_args, path: Optional[str]):
    """Load the reward model in ``path`` for inference (eval mode, frozen): ``(model, tokenizer)``.

    ``path`` is a ``preftune train --loss rm`` output: a LoRA adapter (``adapter_config.json`` with
    task ``SEQ_CLS``, its head in ``modules_to_save``) on the base model — ``--model_name_or_path``,
    else the one recorded in ``path/preftune_config.yaml``, else the default — or a full sequence
    classifier with ``num_labels=1`` (``config.json``). The tokenizer is the one saved in ``path``
    (else the base model's); ``config.pad_token_id`` is set to its pad id.

    Raises:
        ModelLoadError: ``path`` missing, not a model directory, or not a reward model (a causal-LM
            adapter, a causal LM, a classifier with several labels, an adapter without head weights).
    """
    from preftune.models import load_model, load_tokenizer

    if not path:
        raise ModelLoadError("give the reward model directory: --adapter DIR (an output of preftune train --loss rm)")
    p = Path(path)
    if not p.is_dir():
        raise ModelLoadError(f"--adapter {path}: no such directory")
    task = adapter_task(p)
    if task is not None:
        if task != "SEQ_CLS":
            raise ModelLoadError(f"{path} is not a reward model: its adapter has task_type {task} (a policy adapter, "
                                 "no value head); train one with `preftune train --loss rm --use_peft`")
        _check_head_saved(p)
        base_args = _trained_base(model_args, p)
        tokenizer = _tokenizer(p, base_args, load_tokenizer)
        model = load_model(base_args, training=False, reward_model=True)
        model.config.pad_token_id = tokenizer.pad_token_id
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(p))
    elif (p / "config.json").is_file():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(p), trust_remote_code=model_args.trust_remote_code)
        arch = ", ".join(config.architectures or [type(config).__name__])
        if not (config.architectures or [""])[0].endswith("ForSequenceClassification") or config.num_labels != 1:
            raise ModelLoadError(f"{path} is not a reward model: it holds a {arch} with num_labels {config.num_labels} "
                                 "(a reward model is a sequence classifier with num_labels=1; preftune train --loss rm)")
        full_args = dataclasses.replace(model_args, model_name_or_path=str(p))
        tokenizer = _tokenizer(p, full_args, load_tokenizer)
        model = load_model(full_args, training=False, reward_model=True)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        raise ModelLoadError(f"{path} is not a reward model: it holds neither adapter_config.json nor config.json")
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _check_head_saved(path: Path) -> None:
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            if not any(".score." in key or key.endswith("score.weight") for key in f.keys()):
                raise ModelLoadError(f"{path}: the adapter holds no weights of the value head 'score' "
                                     "(modules_to_save); not a trained reward model")


def _tokenizer(path: Path, model_args, load_tokenizer):
    """The tokenizer saved with the reward model (else the base model's); pad falls back to EOS."""
    if (path / "tokenizer_config.json").is_file():
        return load_tokenizer(dataclasses.replace(model_args, model_name_or_path=str(path)))
    return load_tokenizer(model_args)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
@dataclass
class ScoreArguments:
    """What ``preftune score`` scores with and where it writes."""

    _argument_group_name = "score"

    adapter: Optional[str] = field(
        default=None, metadata={"help": "Reward model directory (preftune train --loss rm output: LoRA adapter "
                                "or full model)."})
    output: Optional[str] = field(default=None, metadata={"help": "JSON-lines file to write (one line per record)."})
    batch_size: int = field(default=8, metadata={"help": "Pairs per forward."})
    id_field: str = field(default="id", metadata={"help": "Record field copied to each output line as 'id'."})
    seed: int = field(default=42, metadata={"help": "Seed (for --dataset_sample random)."})
    device: str = field(default="auto", metadata={"help": "Where the model runs: auto (the GPU when there is one), "
                                                  "cpu, cuda or cuda:N."})

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"--batch_size must be > 0, got {self.batch_size}")
        if not self.output:
            raise ConfigError("give --output FILE.jsonl (where the scores go)")


def scored_batches(model, pairs: list[TokenizedPair], engine_args, *, batch_size: int, pad_token_id: int,
                   progress: Optional[str] = None):
    """Yield ``(chunk, scores)`` for ``pairs``, ``batch_size`` pairs per forward, in order, without
    gradients: ``scores`` is what the model's kind computes (``PolicyLogps`` of a policy, ``PairRewards``
    of a reward model) for the laid-out chunk; a tqdm bar named ``progress`` when given. Used by
    ``preftune score`` and ``preftune evaluate``."""
    from preftune.engine.kinds import kind_for

    kind = kind_for(model)
    device = next(model.parameters()).device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc=progress, unit="pair")
    try:
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                batch = kind.collate(chunk, share_prompt=engine_args.share_prompt, padding_free=engine_args.padding_free,
                                     max_tokens_per_batch=engine_args.max_tokens_per_batch, pad_token_id=pad_token_id)
                scores = kind.score(model, {k: v.to(device) for k, v in batch.items()}, engine_args.logprob_chunk_size)
                if chunk and chunk[0].label is not None:  # KTO examples (preftune.data.unpaired): their labels
                    scores.labels = torch.tensor([bool(p.label) for p in chunk], device=device)
                yield chunk, scores
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()


def _load_one(data_args, seed: int):
    from preftune.data import DataError, load_raw, parse_columns, rename_columns

    specs = data_args.dataset if isinstance(data_args.dataset, (list, tuple)) else [data_args.dataset]
    if len(specs) != 1 or specs[0] is None:
        raise DataError("preftune score: give exactly one --dataset file")
    raw = load_raw(specs[0], sample=getattr(data_args, "dataset_sample", "first"), seed=seed)
    try:
        rename_columns([raw], parse_columns(getattr(data_args, "columns", None)))
    except ValueError as err:
        raise DataError(str(err)) from None
    return raw


def _candidate_records(raw):
    """Best-of-n records → one ``{prompt, chosen: c, rejected: c}`` record per candidate (validated)."""
    from preftune.data import DataError, RawData
    from preftune.data.errors import where

    records, locations, owners = [], [], []
    for i, (record, location) in enumerate(zip(raw.records, raw.locations)):
        candidates = record.get("completions")
        if not isinstance(candidates, list) or not candidates:
            raise DataError(f"{where(raw.source, location, 'completions')}: expected a non-empty list of candidate "
                            f"completions, got {type(candidates).__name__}")
        prompt = record.get("prompt")
        for k, cand in enumerate(candidates):
            label = f"completions[{k}]"
            if isinstance(cand, str) and isinstance(prompt, list):
                cand = [{"role": "assistant", "content": cand}]
            if isinstance(cand, str) and not cand.strip() or isinstance(cand, list) and not cand:
                raise DataError(f"{where(raw.source, location, label)}: empty completion")
            if not isinstance(cand, (str, list)):
                raise DataError(f"{where(raw.source, location, label)}: expected a string or a message list, "
                                f"got {type(cand).__name__}")
            records.append({"prompt": prompt, "chosen": cand, "rejected": cand})
            locations.append(f"{location}, {label}")
            owners.append((i, k))
    return RawData(raw.source, records, locations), owners


def _pair_up(items: list[tuple[Any, TokenizedPair]]) -> tuple[list[TokenizedPair], list[tuple[Any, Any]]]:
    """Candidates (each a pair with chosen == rejected) → pairs of two candidates sharing a prompt, so
    the shared-prompt layout computes each prompt once; a candidate left alone scores as itself twice.
    Returns the pairs and, per pair, the keys of its chosen and rejected candidates (None: a copy)."""
    pairs, keys = [], []
    i = 0
    while i < len(items):
        key, first = items[i]
        if i + 1 < len(items) and items[i + 1][1].prompt_ids == first.prompt_ids:
            other_key, other = items[i + 1]
            pairs.append(TokenizedPair(first.prompt_ids, first.chosen_ids, other.chosen_ids))
            keys.append((key, other_key))
            i += 2
        else:
            pairs.append(first)
            keys.append((key, None))
            i += 1
    return pairs, keys


def score_file(model, tokenizer, data_args, engine_args, args: ScoreArguments) -> dict[str, Any]:
    """Score ``data_args.dataset`` with the reward model; write ``args.output``; return a summary.

    Summary: ``records``, ``scored``, ``skipped`` (records), ``mode`` (``pairs`` or
    ``best_of_n``), ``output``, the data report lines (``report``) and, for pairs, ``accuracy``
    (share of scored records with chosen reward > rejected) and ``mean_margin``.

    Raises:
        preftune.data.DataError: bad records (file, record, field), not exactly one ``--dataset``.
    """
    from preftune.data import normalise, tokenize_records

    original = _load_one(data_args, args.seed)
    best_of_n = isinstance(original.records[0], dict) and "completions" in original.records[0]
    raw, owners = _candidate_records(original) if best_of_n else (original, None)
    formatted = normalise(raw, data_args)
    pairs, stats = tokenize_records(formatted.records, tokenizer, data_args, locations=formatted.locations,
                                    source=formatted.source)
    report = [formatted.describe(), stats.summary("data")]
    for line in report:
        logger.info(line)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kept = dict(zip(stats.kept_index, pairs))
    if best_of_n:
        items = [((owners[j][0], owners[j][1]), kept[j]) for j in stats.kept_index]
        to_score, keys = _pair_up(items)
    else:
        to_score, keys = pairs, [((j, "chosen"), (j, "rejected")) for j in stats.kept_index]
    values: dict[Any, float] = {}
    done = 0
    for _, rewards in scored_batches(model, to_score, engine_args, batch_size=args.batch_size,
                                     pad_token_id=pad, progress="score"):
        for c, r in zip(rewards.chosen_rewards.tolist(), rewards.rejected_rewards.tolist()):
            key_c, key_r = keys[done]
            values[key_c] = c
            if key_r is not None:
                values[key_r] = r
            done += 1
    lines = _output_lines(original, formatted, owners, values, stats, args.id_field)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
    scored = [line for line in lines if "skipped" not in line]
    summary: dict[str, Any] = {"mode": "best_of_n" if best_of_n else "pairs", "records": len(lines),
                               "scored": len(scored), "skipped": len(lines) - len(scored), "output": args.output,
                               "report": report}
    if not best_of_n and scored:
        margins = [line["chosen_reward"] - line["rejected_reward"] for line in scored]
        summary["accuracy"] = sum(m > 0 for m in margins) / len(margins)
        summary["mean_margin"] = sum(margins) / len(margins)
    return summary


def _output_lines(original, formatted, owners, values, stats, id_field: str) -> list[dict]:
    ids = [r.get(id_field) if isinstance(r, dict) else None for r in original.records]
    if owners is None:  # pairs: one line per normalised record (1:1 with the file unless converted)
        same = len(formatted.records) == len(original.records)
        lines = []
        for j in range(len(formatted.records)):
            line: dict[str, Any] = {"index": j}
            if same and ids[j] is not None:
                line["id"] = ids[j]
            if (j, "chosen") in values:
                line.update(chosen_reward=values[j, "chosen"], rejected_reward=values[j, "rejected"])
            else:
                line.update(chosen_reward=None, rejected_reward=None, skipped=_why_dropped(stats))
            lines.append(line)
        return lines
    lines = []
    for i in range(len(original.records)):
        count = sum(1 for o in owners if o[0] == i)
        rewards = [values.get((i, k)) for k in range(count)]
        line = {"index": i}
        if ids[i] is not None:
            line["id"] = ids[i]
        line["rewards"] = rewards
        present = [(r, k) for k, r in enumerate(rewards) if r is not None]
        line["best"] = max(present)[1] if present else None
        if len(present) < count:
            line["skipped"] = {str(k): _why_dropped(stats) for k, r in enumerate(rewards) if r is None}
        lines.append(line)
    return lines


def _why_dropped(stats) -> str:
    reasons = sorted(stats.dropped)
    return reasons[0] if len(reasons) == 1 else "dropped at tokenisation (" + ", ".join(reasons) + ")"


def run_score(model_args, data_args, engine_args, args: ScoreArguments) -> dict[str, Any]:
    """``preftune score``: open the reward model in ``args.adapter`` and score the file."""
    from preftune.run_setup import configure_numerics

    policy = configure_numerics(engine_args, args.device)
    model, tokenizer = open_reward_model(model_args, args.adapter)
    if getattr(model, "quantization_method", None) is None:
        model.to(policy.device)
    return score_file(model, tokenizer, data_args, engine_args, args)
