"""Vision–language preference training: image records, the vision kind of the engine, LoRA, CLI.

Tiny random models of three families are built from configs (``tests/vlm_tiny.py``: LLaVA,
Qwen2-VL with M-RoPE, Idefics3) with real transformers processors and small generated PNGs. The
engine's log-probs and gradients on image pairs must equal a naive path — the model's own forward
``model(**processor outputs)`` on ``[P C]`` and on ``[P R]`` separately, full logits,
log-softmax — in every layout.
"""

from __future__ import annotations

import json

import pytest
import torch
import vlm_tiny as V

from preftune.config import DataArguments, LossArguments
from preftune.data import DataError
from preftune.data.vision import open_image, tokenize_image_records
from preftune.engine.kinds.vision import KIND as VISION
from preftune.engine.logprobs import sequence_logps
from preftune.engine.reference import pair_key
from preftune.losses import compute_loss

LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return V.write_images(tmp_path_factory.mktemp("images"), 8)


def records(paths):
    """Conversational with tags (2 images), standard without tags (images first), a text-only pair,
    and TRL content parts (1 image)."""
    return [
        {"prompt": [{"role": "user", "content": "Look <image> and <image>: which is darker?"}],
         "chosen": [{"role": "assistant", "content": "The first."}],
         "rejected": [{"role": "assistant", "content": "I cannot see any picture at all"}], "images": paths[:2]},
        {"prompt": "Describe the picture:", "chosen": " red squares", "rejected": " a blue sky", "images": paths[2:3]},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": "What colour? "}, {"type": "image"}]}],
         "chosen": [{"role": "assistant", "content": "Green"}],
         "rejected": [{"role": "assistant", "content": "Purple and orange"}], "images": paths[3:4]},
    ]


def tokenize(processor, recs, **kw):
    args = DataArguments(max_length=kw.pop("max_length", 512), max_prompt_length=kw.pop("max_prompt_length", 64), **kw)
    return tokenize_image_records(recs, processor, args, source="test.jsonl")


def naive_logps(model, processor, pairs):
    """``model(**processor(prompt, images))`` on [P C] and [P R] apart, full logits, log-softmax."""
    out_c, out_r = [], []
    for pair in pairs:
        for rejected, comp, out in ((False, pair.chosen_ids, out_c), (True, pair.rejected_ids, out_r)):
            kwargs, prompt = {}, pair.prompt_ids
            if pair.images is not None:
                paths = pair.images.rejected_paths if rejected and pair.images.rejected_paths else pair.images.paths
                enc = processor(text=[pair.images.prompt_text], images=[[open_image(p) for p in paths]],
                                return_tensors="pt", add_special_tokens=pair.images.loader.add_special_tokens)
                prompt = enc["input_ids"][0].tolist()
                kwargs = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
                if "mm_token_type_ids" in enc:
                    kwargs["mm_token_type_ids"] = torch.cat(
                        [enc["mm_token_type_ids"], torch.zeros(1, len(comp), dtype=enc["mm_token_type_ids"].dtype)], 1)
            ids = torch.tensor([prompt + comp])
            logits = model(input_ids=ids, **kwargs).logits[0].float()
            logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            out.append(logp[len(prompt) - 1:].sum())
    return torch.stack(out_c), torch.stack(out_r)


def layout(pairs, share_prompt, padding_free):
    longest = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    batch = VISION.collate(pairs, share_prompt=share_prompt, padding_free=padding_free,
                           max_tokens_per_batch=2 * longest, pad_token_id=0)
    if padding_free:
        assert int(batch["segment_ids"].max()) >= 1, "no row holds two units: packing untested"
    return batch


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("family", V.ALL_FAMILIES)
def test_layouts_match_naive_logps_and_grads(family, images):
    model, processor = V.tiny_vlm(family)
    pairs, stats = tokenize(processor, records(images))
    assert stats.kept == 4 and stats.images == 4 and [p.images is not None for p in pairs] == [True, True, False, True]
    ref_c, ref_r = naive_logps(model, processor, pairs)
    (ref_c.sum() - 0.5 * ref_r.sum()).backward()
    ref_grads = _grads(model)
    vision_grad = max(g.abs().max().item() for (n, _), g in zip(model.named_parameters(), ref_grads)
                      if "vision" in n or "visual" in n)
    assert vision_grad > 0  # the vision tower is trained here: its gradients are compared too
    model.zero_grad(set_to_none=True)
    for share_prompt, padding_free in LAYOUTS:
        # gradients in every layout for the three main families; in the default layout for the others
        grads = family in V.FAMILIES or (share_prompt and padding_free)
        with torch.set_grad_enabled(grads):
            out = sequence_logps(model, layout(pairs, share_prompt, padding_free), chunk_size=16)
        torch.testing.assert_close(out.chosen_logps, ref_c, atol=1e-4, rtol=0)
        torch.testing.assert_close(out.rejected_logps, ref_r, atol=1e-4, rtol=0)
        if not grads:
            continue
        (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
        for (name, _), g, g_ref in zip(model.named_parameters(), _grads(model), ref_grads):
            torch.testing.assert_close(g, g_ref, atol=1e-5 * max(1.0, g_ref.abs().max().item()), rtol=1e-4,
                                       msg=lambda m, n=name: f"{n}: {m}")
        model.zero_grad(set_to_none=True)


def test_eager_attention_and_frozen_vision_tower(images):
    """Eager kernel (additive 4-D mask); vision tower frozen: features under no_grad, the language
    model's gradients unchanged."""
    model, processor = V.tiny_vlm("llava", attn="eager")
    pairs, _ = tokenize(processor, records(images)[:2])
    ref_c, ref_r = naive_logps(model, processor, pairs)
    from preftune.models.vision import freeze_vision_tower

    assert freeze_vision_tower(model) > 0
    (ref_c.sum() + ref_r.sum()).backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    out = sequence_logps(model, layout(pairs, True, True))
    torch.testing.assert_close(out.chosen_logps, ref_c, atol=1e-4, rtol=0)
    (out.chosen_logps.sum() + out.rejected_logps.sum()).backward()
    for g, g_ref in zip(_grads(model), ref_grads):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", V.ALL_FAMILIES)
def test_vision_encoder_runs_once_per_image(family, images):
    """Every layout: one vision-encoder call per batch, each image through it once (not per branch)."""
    model, processor = V.tiny_vlm(family)
    pairs, _ = tokenize(processor, records(images))
    tower = {"llava": "vision_tower", "llava_next": "vision_tower", "qwen2_vl": "visual", "qwen2_5_vl": "visual",
             "idefics3": "vision_model", "smolvlm": "vision_model"}[family]
    calls = []
    getattr(model.model, tower).register_forward_hook(lambda m, a, k, o: calls.append(a[0].shape[0] if a else
                                                                                      k["pixel_values"].shape[0]),
                                                      with_kwargs=True)
    for share_prompt, padding_free in LAYOUTS:
        calls.clear()
        with torch.no_grad():
            sequence_logps(model, layout(pairs, share_prompt, padding_free))
        assert len(calls) == 1
        if family in ("llava", "idefics3", "smolvlm"):  # the others' towers take patches / tiles, not images
            assert calls[0] == 4  # 4 images in the batch (2 + 1 + 0 + 1), each encoded once


def test_rejected_images_get_their_own_prompt(images):
    """ms-swift ``rejected_images``: same text, other pictures on the rejected side (no shared prompt for it)."""
    model, processor = V.tiny_vlm("qwen2_vl")
    recs = records(images)[:2]
    recs[0]["rejected_images"] = images[5:7]  # other sizes: Qwen2-VL gives the rejected prompt other token counts
    pairs, _ = tokenize(processor, recs)
    assert pairs[0].images.rejected_paths == images[5:7] and pairs[0].images.rejected_prompt_ids is not None
    ref_c, ref_r = naive_logps(model, processor, pairs)
    with torch.no_grad():
        for share_prompt, padding_free in LAYOUTS:
            out = sequence_logps(model, layout(pairs, share_prompt, padding_free))
            torch.testing.assert_close(out.chosen_logps, ref_c, atol=1e-4, rtol=0)
            torch.testing.assert_close(out.rejected_logps, ref_r, atol=1e-4, rtol=0)
    assert pair_key(pairs[0]) != pair_key(tokenize(processor, records(images)[:1])[0][0])


@pytest.mark.parametrize("loss", ["dpo", "cpo", "simpo", "cpo-simpo", "orpo", "sft"])
def test_every_loss_on_image_pairs(loss, images):
    """Each loss of the table on an image batch: finite, and its gradient reaches the language model."""
    model, processor = V.tiny_vlm("llava")
    pairs, _ = tokenize(processor, records(images))
    logps = sequence_logps(model, layout(pairs, True, True))
    args = LossArguments(loss=loss, rpo_alpha=0.5 if loss == "dpo" else None)
    if args.needs_reference:
        logps.ref_chosen_logps = logps.chosen_logps.detach() - 0.3
        logps.ref_rejected_logps = logps.rejected_logps.detach() + 0.2
    out = compute_loss(logps, args)
    loss_value = out.losses.mean()
    assert torch.isfinite(loss_value)
    loss_value.backward()
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_reference_key_depends_on_image_bytes(images, tmp_path):
    _, processor = V.tiny_vlm("llava")
    copy = tmp_path / "copy.png"
    copy.write_bytes(open(images[2], "rb").read())
    other = V.write_images(tmp_path / "other", 3, seed=5)[2]  # same size as images[2]: same tokens
    rec = records(images)[1]
    a = tokenize(processor, [rec])[0][0]
    b = tokenize(processor, [dict(rec, images=[str(copy)])])[0][0]
    c = tokenize(processor, [dict(rec, images=[other])])[0][0]
    assert a.prompt_ids == c.prompt_ids
    assert pair_key(a) == pair_key(b) != pair_key(c)


# ---------------------------------------------------------------------------------------------
# Data: placement of images, errors
# ---------------------------------------------------------------------------------------------


def test_images_without_tags_go_before_the_first_user_text(images):
    _, processor = V.tiny_vlm("llava")
    rec = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is it?"}],
           "chosen": [{"role": "assistant", "content": "A cat."}],
           "rejected": [{"role": "assistant", "content": "A dog."}], "images": images[:2]}
    pair = tokenize(processor, [rec])[0][0]
    assert pair.images.prompt_text == "<|system|>Be brief.\n<|user|><image><image>What is it?\n<|assistant|>"
    standard = tokenize(processor, [{"prompt": "Q?", "chosen": " a", "rejected": " b", "images": images[:1]}])[0][0]
    assert standard.images.prompt_text == "<image>Q?"
    assert standard.prompt_ids.count(pair.images.image_token_id) == 4  # (16/8)^2 patches, CLS dropped


def test_long_image_prompt_is_never_cut(images):
    _, processor = V.tiny_vlm("llava")
    n = len(tokenize(processor, records(images)[:1])[0][0].prompt_ids)
    pairs, stats = tokenize(processor, records(images)[:1], max_prompt_length=8, max_length=n + 3)
    assert stats.long_image_prompts == 1 and stats.prompts_truncated == 0 and stats.completions_truncated == 2
    assert len(pairs[0].prompt_ids) == n and pairs[0].prompt_ids.count(pairs[0].images.image_token_id) == 8
    assert len(pairs[0].chosen_ids) == 3 and "kept whole" in stats.summary()
    pairs, stats = tokenize(processor, records(images)[:1], max_prompt_length=8, max_length=n)
    assert not pairs and stats.dropped == {"prompt with images fills max_length": 1}


@pytest.mark.parametrize("case,message", [
    ("count", "2 images but 1 <image> tags"),
    ("missing", "image file not found"),
    ("not_image", "cannot read"),
    ("completion_tag", "tag or image part in a completion"),
])
def test_bad_image_records(case, message, images, tmp_path):
    _, processor = V.tiny_vlm("llava")
    rec = records(images)[0]
    field = "images"
    if case == "count":
        rec["prompt"] = [{"role": "user", "content": "Only <image> here"}]
    elif case == "missing":
        rec["images"] = [images[0], str(tmp_path / "gone.png")]
        field = "images[1]"
    elif case == "not_image":
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        rec["images"] = [str(bad), images[1]]
        field = "images[0]"
    else:
        rec["chosen"] = [{"role": "assistant", "content": "see <image>"}]
        field = "chosen"
    with pytest.raises(DataError) as err:
        tokenize(processor, [records(images)[2], rec])
    text = str(err.value)
    assert message in text and "test.jsonl, record 2" in text and f"field '{field}'" in text
    if case in ("missing", "not_image"):
        assert rec["images"][0 if case == "not_image" else 1] in text


def test_example_file_is_valid():
    """examples/vlm: a swift-format file with two images, readable as shipped."""
    import os

    folder = os.path.join(os.path.dirname(__file__), "..", "examples", "vlm")
    with open(os.path.join(folder, "swift_dpo.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    assert rows and all(len(r["images"]) >= 1 for r in rows)
    for row in rows:
        for path in row["images"] + row.get("rejected_images", []):
            open_image(os.path.join(folder, path))


# ---------------------------------------------------------------------------------------------
# Loading, LoRA, CLI end to end
# ---------------------------------------------------------------------------------------------

EXAMPLES = __import__("pathlib").Path(__file__).parent.parent / "examples" / "vlm"


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A tiny LLaVA saved as a model directory (config, safetensors, processor, chat template)."""
    path = tmp_path_factory.mktemp("tiny-llava")
    model, processor = V.tiny_vlm("llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _flags(model_dir, out, dataset, *extra):
    return ["--model_name_or_path", model_dir, "--dataset", str(dataset), "--output_dir", str(out), "--use_peft",
            "--lora_r", "4", "--lora_alpha", "8", "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--learning_rate", "5e-2", "--save_strategy", "no", "--report_to", "none", "--seed", "1",
            "--dataloader_num_workers", "0", *extra]


def test_loading_and_lora_targets_language_model_only(llava_dir):
    from preftune.config import ModelArguments, PeftArguments
    from preftune.models import load_model_and_tokenizer

    model, processor = load_model_and_tokenizer(ModelArguments(model_name_or_path=llava_dir),
                                                PeftArguments(use_peft=True, lora_target_modules=["ALL"]))
    assert type(processor).__name__ == "LlavaProcessor" and processor.tokenizer.pad_token is not None
    targets = model.peft_config["default"].target_modules
    assert targets and all(t.startswith("model.language_model.") for t in targets)
    assert any(t.endswith("mlp.down_proj") for t in targets)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    # --freeze_vision_tower false: the vision tower's linear layers get LoRA too
    model, _ = load_model_and_tokenizer(ModelArguments(model_name_or_path=llava_dir, freeze_vision_tower=False),
                                        PeftArguments(use_peft=True, lora_target_modules=["q_proj", "v_proj"]))
    targets = model.peft_config["default"].target_modules
    assert {t.split(".")[1] for t in targets} == {"language_model", "vision_tower"}
    assert all(t.endswith(("q_proj", "v_proj")) for t in targets)
    # full fine-tuning: vision tower frozen by default, language model trained
    model, _ = load_model_and_tokenizer(ModelArguments(model_name_or_path=llava_dir), PeftArguments())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not any(v for n, v in grads.items() if "vision_tower" in n or "projector" in n)
    assert all(v for n, v in grads.items() if "language_model" in n)


def test_cli_swift_file_with_images_dpo_adapter_saved_and_reloaded(llava_dir, tmp_path, capsys):
    from preftune.cli import main

    out = tmp_path / "run"
    assert main(["train", *_flags(llava_dir, out, EXAMPLES / "swift_dpo.jsonl", "--loss", "dpo", "--max_steps", "4")]) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "processor_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    report = (out / "data_report.txt").read_text()
    assert "format swift3" in report and "6 images" in report
    history = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(history) == 4 and history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # reloaded adapter (preftune evaluate): policy != reference, margins moved the trained way
    base_json, tuned_json = tmp_path / "base.json", tmp_path / "tuned.json"
    common = ["evaluate", "--model", llava_dir, "--dataset", str(EXAMPLES / "swift_dpo.jsonl"), "--loss", "dpo"]
    assert main([*common, "--output_json", str(base_json)]) == 0
    assert main([*common, "--adapter", str(out), "--output_json", str(tuned_json)]) == 0
    base, tuned = json.loads(base_json.read_text()), json.loads(tuned_json.read_text())
    assert base["rewards/margins"] == pytest.approx(0.0, abs=1e-5) and tuned["rewards/margins"] > 0.1
    assert tuned["num_pairs"] == 4
    # generate with images: base and adapter answers for each prompt
    capsys.readouterr()
    assert main(["generate", "--model", llava_dir, "--adapter", str(out), "--dataset",
                 str(EXAMPLES / "swift_dpo.jsonl"), "--num_prompts", "2", "--max_new_tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("**adapter**") == 2 and "<image>" in printed


def test_cli_sharegpt_file_with_image_tags_cpo(llava_dir, tmp_path):
    from preftune.cli import main

    out = tmp_path / "run"
    assert main(["train", *_flags(llava_dir, out, EXAMPLES / "sharegpt_dpo.json", "--loss", "cpo", "--max_steps", "2",
                                  "--lora_target_modules", "DEFAULT", "--gradient_checkpointing", "true",
                                  "--eval_ratio", "0.34")]) == 0
    history = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(history) == 2 and history[0]["loss"] != history[1]["loss"]
    assert "format sharegpt" in (out / "data_report.txt").read_text()
    assert "eval_rewards/accuracies" in json.loads((out / "eval_results.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] and all(".language_model." in f".{t}" for t in config["target_modules"])


def test_cli_bad_image_inputs(llava_dir, tiny_model_dir, tmp_path, capsys):
    from preftune.cli import main

    rows = [json.loads(line) for line in (EXAMPLES / "swift_dpo.jsonl").read_text().splitlines() if line.strip()]
    for name in ("red_square.png", "blue_circle.png"):
        (tmp_path / name).write_bytes((EXAMPLES / name).read_bytes())

    def write(name, records):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    cases = [
        # images with a text-only model
        (tiny_model_dir, write("ok.jsonl", rows), "line 1, field 'images'", "text-only"),
        # a missing image
        (llava_dir, write("missing.jsonl", rows[:1] + [dict(rows[1], images=["gone.png"])]), "line 2", "gone.png"),
        # two tags, one image
        (llava_dir, write("count.jsonl", [dict(rows[0], images=["red_square.png"])]), "line 1, field 'images'",
         "1 images but 2 <image> tags"),
    ]
    for model_dir, dataset, where_text, message in cases:
        capsys.readouterr()
        assert main(["train", *_flags(model_dir, tmp_path / "out", dataset, "--max_steps", "1")]) == 2
        err = capsys.readouterr().err
        assert str(dataset) in err and where_text in err and message in err, err


# ---------------------------------------------------------------------------------------------
# TRL 1.16 parity: DPOTrainer on the same image batch (tiny LLaVA)
# ---------------------------------------------------------------------------------------------

PARITY_TOL = 1e-5
PARITY_RECORDS = [
    ("What is in the picture?", "A cat.", "Nothing at all, sorry."),
    ("Colour?", "Red and green.", "Blue"),
    ("Describe it briefly.", "Squares.", "A long story about dogs."),
    ("Count the shapes.", "Three.", "Eleven or twelve"),
]


class _FixedPixels:
    """A PairImages loader returning given processor outputs (TRL's own pixel values for the pair)."""

    def __init__(self, outputs):
        self.outputs = outputs
        self.add_special_tokens = False

    def __call__(self, prompt_text, paths):
        return self.outputs


@pytest.mark.parametrize("case", ["dpo-sigmoid", "dpo-rpo"])
def test_trl_dpo_trainer_parity_on_image_batch(case, images, tmp_path):
    """TRL's DPOTrainer (processor as processing_class, ``images`` column) and preftune score the same
    image batch: same tokens from the same records, same loss, metrics and gradients (every layout)."""
    import copy

    import trl_helpers as H
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from preftune.types import PairImages

    policy, processor = V.tiny_vlm("llava", seed=0)
    ref, _ = V.tiny_vlm("llava", seed=1)
    recs = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}], "images": [images[i]]}
            for i, (q, c, r) in enumerate(PARITY_RECORDS)]
    trl_kwargs = dict(loss_type=["sigmoid"], beta=0.1) if case == "dpo-sigmoid" else \
        dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7], beta=0.1)
    args = DPOConfig(**H.trl_common_args(tmp_path), max_length=None, precompute_ref_log_probs=False, **trl_kwargs)
    rows = [dict(r, images=[open_image(p) for p in r["images"]]) for r in recs]
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=processor)
    batch = H.first_batch(trainer)
    trainer.model.zero_grad(set_to_none=True)
    trl_loss, trl_metrics = H.trl_step(trainer, batch)
    trl_loss.backward()
    trl_grads = _grads(trainer.model)
    assert trl_metrics["rewards/margins"] != 0.0

    # preftune's own tokenisation of the same records gives TRL's tokens (prompt with expanded images),
    # except the template's whitespace after the end-of-turn EOS, which TRL scores and preftune does
    # not (tokenize.py); the engine then scores TRL's exact tokens
    ours, _ = tokenize(processor, recs)
    theirs = H.pairs_from_dpo_batch(batch)
    eos = processor.tokenizer.eos_token_id

    def upto_eos(ids):
        return tuple(ids[:len(ids) - ids[::-1].index(eos)])

    by_tokens = {(tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids)): p for p in ours}
    pairs = []
    b = len(theirs)
    for i, pair in enumerate(theirs):
        mine = by_tokens[tuple(pair.prompt_ids), upto_eos(pair.chosen_ids), upto_eos(pair.rejected_ids)]
        pixels = batch["pixel_values"][i:i + 1]  # TRL's pixels of pair i (its rejected copy: row b + i, equal)
        assert torch.equal(pixels, batch["pixel_values"][b + i:b + i + 1])
        pair.images = PairImages(paths=mine.images.paths, prompt_text=mine.images.prompt_text,
                                 image_token_id=mine.images.image_token_id, digest=mine.images.digest,
                                 loader=_FixedPixels({"pixel_values": pixels,
                                                      "input_ids": torch.tensor([pair.prompt_ids])}))
        pairs.append(pair)
    loss_args = LossArguments(loss="dpo", beta=0.1, rpo_alpha=0.7 if case == "dpo-rpo" else None)
    model = copy.deepcopy(policy)
    diffs = {"loss": 0.0, "metrics": 0.0, "grad/max": 0.0}
    for share_prompt, padding_free in LAYOUTS:
        batch_ours = layout(pairs, share_prompt, padding_free)
        model.train()
        logps = sequence_logps(model, batch_ours, 16)
        with torch.no_grad():
            reference = sequence_logps(ref, batch_ours, 16)
        logps.ref_chosen_logps, logps.ref_rejected_logps = reference.chosen_logps, reference.rejected_logps
        out = compute_loss(logps, loss_args)
        loss = out.losses.mean()
        metrics = {k: float(v) for k, v in out.metrics.items()}  # TRL's names (rewards/*, logps/*)
        assert abs(float(loss) - float(trl_loss)) <= PARITY_TOL, (share_prompt, padding_free, float(loss), float(trl_loss))
        for key in H.COMPARED:
            assert abs(metrics[key] - trl_metrics[key]) <= PARITY_TOL, (key, metrics[key], trl_metrics[key])
        loss.backward()
        grads = _grads(model)
        model.zero_grad(set_to_none=True)
        scale = max(g.abs().max().item() for g in trl_grads)
        worst = max((a - g).abs().max().item() for a, g in zip(grads, trl_grads))
        assert worst <= 1e-5 * scale, (share_prompt, padding_free, worst, scale)
        diffs["loss"] = max(diffs["loss"], abs(float(loss) - float(trl_loss)))
        diffs["metrics"] = max(diffs["metrics"], *(abs(metrics[k] - trl_metrics[k]) for k in H.COMPARED))
        diffs["grad/max"] = max(diffs["grad/max"], worst / scale)
    print(f"\nTRL parity on images ({case}, 4 layouts): " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


def test_unsupported_vision_family_is_one_clear_error(tmp_path, capsys):
    """A vision–language type outside the tested families (PaliGemma: bidirectional attention over
    the image prefix) is refused from its config, before any weights or processor are read."""
    from preftune.cli import main

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
        "vision_config": {"model_type": "siglip_vision_model"}, "text_config": {"model_type": "gemma"}}))
    dataset = EXAMPLES / "swift_dpo.jsonl"
    assert main(["train", *_flags(str(tmp_path), tmp_path / "out", dataset, "--max_steps", "1")]) == 2
    err = capsys.readouterr().err
    assert "'paligemma' is not supported" in err and "LLaVA (llava)" in err and "Qwen2-VL (qwen2_vl)" in err


def test_idefics3_image_splitting(tmp_path):
    """Idefics3 with its default image splitting: each image becomes tiles + a global image, with
    row/column tokens; the tiles of all prompts go through the encoder as one batch."""
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    model, processor = V.tiny_vlm("idefics3")
    processor.image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 16},
                                                          do_image_splitting=True)
    paths = V.write_images(tmp_path, 6, sizes=((20, 40), (32, 32), (40, 16)))
    pairs, _ = tokenize(processor, records(paths), max_length=2000)
    assert pairs[0].images.load()["pixel_values"].shape[0] > 2  # tiles, not just the two images
    ref_c, ref_r = naive_logps(model, processor, pairs)
    with torch.no_grad():
        for share_prompt, padding_free in LAYOUTS:
            out = sequence_logps(model, layout(pairs, share_prompt, padding_free))
            torch.testing.assert_close(out.chosen_logps, ref_c, atol=1e-4, rtol=0)
            torch.testing.assert_close(out.rejected_logps, ref_r, atol=1e-4, rtol=0)
