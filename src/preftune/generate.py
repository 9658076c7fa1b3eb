"""Side-by-side generations: the base model and the tuned adapter on the same prompts.

``preftune generate --adapter OUTPUT_DIR --dataset FILE [--num_prompts 5]`` prints a markdown
section per prompt with the base model's answer, the adapter's answer, and the data set's
chosen / rejected answers, and can write the same as JSON lines. Greedy decoding by default, so
two runs print the same text.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import torch


def answers(model, run, has_adapter: bool) -> dict[str, str]:
    """``{"base", "adapter"}`` answers of ``run()`` (the adapter switched off for the base), or ``{"model"}``
    without an adapter."""
    if not has_adapter:
        return {"model": run()}
    with model.disable_adapter():
        base = run()
    return {"base": base, "adapter": run()}


def _prompt_text(tokenizer, prompt) -> str:
    if isinstance(prompt, list):  # conversational
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def _completion_text(value) -> str:
    if isinstance(value, list):
        return "".join(m.get("content", "") for m in value)
    return value


@torch.no_grad()
def generate_side_by_side(model, tokenizer, records: list[dict], *, max_new_tokens: int = 128,
                          do_sample: bool = False, temperature: float = 1.0) -> list[dict]:
    """For each record (``prompt`` [, ``chosen``, ``rejected``]), the base and adapter completions.

    ``model`` is a peft model (the base is the same model with adapters disabled) or a plain
    model (then only ``"model"`` is filled). Returns dicts with ``prompt``, ``base``, ``adapter``
    (or ``model``), ``chosen``, ``rejected`` (strings; missing fields are None).
    """
    from preftune.data.vision import is_processor, prompt_inputs, text_tokenizer
    from preftune.engine.kinds import kind_for

    model.eval()
    has_adapter = hasattr(model, "disable_adapter")
    # an encoder–decoder model returns the decoder's tokens only (after its start token), not the prompt
    after_prompt = kind_for(model).generates_after_prompt
    processor, tokenizer = tokenizer, text_tokenizer(tokenizer)  # a VLM's processor renders images too
    out = []
    for rec in records:
        if is_processor(processor):  # prompt with its images (data/vision.py), pixel tensors in enc
            text, enc = prompt_inputs(processor, rec)
        else:
            text = _prompt_text(tokenizer, rec["prompt"])
            enc = tokenizer(text, return_tensors="pt", add_special_tokens=not isinstance(rec["prompt"], list))
        enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": tokenizer.pad_token_id}
        if do_sample:
            kwargs["temperature"] = temperature

        def run(enc=enc, kwargs=kwargs) -> str:
            ids = model.generate(**enc, **kwargs)[0, enc["input_ids"].shape[1] if after_prompt else 1:]
            return tokenizer.decode(ids, skip_special_tokens=True).strip()

        row = {"prompt": text, "chosen": _completion_text(rec.get("chosen")),
               "rejected": _completion_text(rec.get("rejected"))}
        row.update(answers(model, run, has_adapter))
        out.append(row)
    return out


@torch.no_grad()
def generate_from_pairs(model, tokenizer, pairs, *, max_new_tokens: int = 64) -> list[dict]:
    """Greedy generations for tokenised pairs (:class:`preftune.types.TokenizedPair`, e.g. the eval
    split after training): the prompt's token ids as they were trained on, decoded for display.

    Same rows as :func:`generate_side_by_side` (``prompt``, ``base`` + ``adapter`` for a peft model,
    else ``model``, and the pair's ``chosen`` / ``rejected`` decoded). Pairs with images and KTO's
    unpaired examples (``label`` set) are skipped; the caller reports how many rows came back.
    """
    from preftune.data.vision import text_tokenizer
    from preftune.engine.kinds import kind_for

    was_training = model.training
    model.eval()
    tok = text_tokenizer(tokenizer)
    after_prompt = kind_for(model).generates_after_prompt
    device = next(model.parameters()).device
    has_adapter = hasattr(model, "disable_adapter")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def decode(ids) -> str:
        return tok.decode(ids, skip_special_tokens=True).strip()

    from tqdm.auto import tqdm

    from preftune.engine.reference import progress_disabled

    out = []
    try:
        for pair in tqdm(pairs, desc="generations (base, tuned)" if has_adapter else "generations", unit="prompt",
                         dynamic_ncols=True, disable=progress_disabled()):
            if pair.images is not None or pair.label is not None:
                continue
            ids = torch.tensor([pair.prompt_ids], device=device)
            enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

            def run(enc=enc) -> str:
                new = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
                return decode(new[0, enc["input_ids"].shape[1] if after_prompt else 1:])

            row = {"prompt": decode(pair.prompt_ids), "chosen": decode(pair.chosen_ids),
                   "rejected": decode(pair.rejected_ids)}
            row.update(answers(model, run, has_adapter))
            out.append(row)
    finally:
        model.train(was_training)
    return out


def to_markdown(rows: list[dict]) -> str:
    """One ``###`` section per prompt, each answer in a quoted block."""
    parts = []
    for i, row in enumerate(rows, 1):
        parts.append(f"### {i}\n\n**prompt**\n\n```\n{row['prompt'].strip()}\n```\n")
        for key in ("base", "adapter", "model", "chosen", "rejected"):
            if row.get(key) is not None:
                body = row[key].strip().replace("\n", "\n> ") or "(empty)"
                parts.append(f"**{key}**\n\n> {body}\n")
    return "\n".join(parts)


def check_adapter_dir(path: str) -> None:
    """A local ``--adapter`` must be a directory holding ``adapter_config.json`` (a LoRA adapter, as
    ``preftune train --use_peft`` writes); an ``owner/name`` that is not a local path is left to the Hub.

    Raises:
        ModelLoadError: naming the directory and what is missing.
    """
    from preftune.errors import ModelLoadError

    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ModelLoadError(f"--adapter {path}: no adapter_config.json in this directory; give the directory "
                                 "of a LoRA adapter (the --output_dir of `preftune train --use_peft true`)")
    elif os.path.exists(path):
        raise ModelLoadError(f"--adapter {path}: not a directory; give the directory of a LoRA adapter")
    elif path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelLoadError(f"--adapter {path}: directory not found (and not a Hub id owner/name)")


def main(argv: Optional[list[str]] = None) -> int:
    """``preftune generate``: see the module docstring."""
    from peft import PeftModel

    from preftune.config import DataArguments, ModelArguments
    from preftune.data import load_raw, normalise
    from preftune.device import DevicePolicy
    from preftune.models import load_model, load_tokenizer

    p = argparse.ArgumentParser(prog="preftune generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "--model_name_or_path", dest="model", default=None,
                   help="Base model (default: SmolLM2-135M-Instruct).")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (a preftune output_dir).")
    p.add_argument("--dataset", default=None, help="Preference data whose prompts are used (default: the demo set).")
    p.add_argument("--num_prompts", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--do_sample", action="store_true")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--output_jsonl", default=None)
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N.")
    args = p.parse_args(argv)
    if args.adapter:
        check_adapter_dir(args.adapter)  # before the base model loads
    policy = DevicePolicy.of(args.device)
    model_args = ModelArguments(model_name_or_path=args.model)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, training=False)
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter)
    model.to(policy.device)
    data = normalise(load_raw(args.dataset), DataArguments(dataset=args.dataset))
    rows = generate_side_by_side(model, tokenizer, data.records[:args.num_prompts],
                                 max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                 temperature=args.temperature)
    print(to_markdown(rows))
    if args.output_jsonl:
        with open(args.output_jsonl, "w") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return 0
