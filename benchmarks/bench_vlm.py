"""preftune vs TRL 1.16 DPO on a tiny LLaVA-style model, two 224x224 images per pair: A/B in one run.

    .venv/bin/python benchmarks/bench_vlm.py                       # default measurement (quiet machine!)
    .venv/bin/python benchmarks/bench_vlm.py --pairs 8 --steps 2 --rounds 1 --out /tmp/vlm.json   # smoke run

The model (random weights, built from a config and saved once): CLIP vision tower at 224 px, patch
16 (196 image tokens per image after the CLS token is dropped), an MLP projector and a Llama
language model over a byte-level vocabulary (tests/vlm_tiny.py). Data: conversational pairs, each
prompt with two generated 224x224 PNGs (placed before the text), short answers.

Both tools train DPO with their defaults (preftune: reference log-probs precomputed once, shared
prompt, padding-free packing; TRL: ``DPOTrainer`` with the processor as processing class, the
reference = the same model with the adapter disabled, computed in every step) on the same
records, same LoRA (r 16, alpha 32, dropout 0.05, on the language model's linear layers only —
TRL is given preftune's resolved module list), same batch size, learning rate, steps, float32, CPU.
Each (tool, round) runs in its own process; rounds alternate A/B so the ratios compare runs taken
minutes apart. Measured per run:

* throughput: pairs per second over the training steps after the first (warm-up) step;
  preftune's one-off reference pass is timed apart (``reference_s``) and included in ``total_s``;
* peak RSS: ``VmHWM`` during training (reset after setup), and the process's ``ru_maxrss``;
* vision-encoder work: a forward hook on the vision tower counts calls and images encoded; per
  pair and step, and for preftune's reference pass apart.

Writes a JSON with every run and the ratios (preftune / TRL), and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

# no <image> tags: TRL puts a conversational record's images before the first user text (and does not
# read tags), preftune does the same for a record without tags, so both see the same prompt
QUESTIONS = [("Compare the two pictures. Which is brighter?", "The first one, clearly.", "Neither."),
             ("Describe both pictures in a few words.", "Two noisy squares.", "A cat and a dog."),
             ("What differs between them?", "The colours.", "Nothing at all, they are equal."),
             ("Are they the same size?", "Yes, both 224 pixels.", "No.")]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def prepare(work: Path, pairs: int, seed: int = 0) -> tuple[Path, Path]:
    """The tiny model directory and the JSONL data (two 224x224 PNGs per pair) under ``work``."""
    import vlm_tiny as V

    model_dir = work / "tiny-llava-224"
    if not (model_dir / "config.json").is_file():
        model, processor = V.tiny_llava(seed=seed, image_size=224, patch_size=16, vision_hidden=64, vision_layers=2)
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
    images = V.write_images(work / "images", 2 * pairs, seed=seed, sizes=((224, 224),))
    data = work / "pairs.jsonl"
    with open(data, "w") as fh:
        for i in range(pairs):
            q, c, r = QUESTIONS[i % len(QUESTIONS)]
            fh.write(json.dumps({"prompt": [{"role": "user", "content": q}],
                                 "chosen": [{"role": "assistant", "content": c}],
                                 "rejected": [{"role": "assistant", "content": r}],
                                 "images": images[2 * i:2 * i + 2]}) + "\n")
    return model_dir, data


class _VisionCounter:
    """Forward hook on the vision tower: calls and images encoded."""

    def __init__(self, tower):
        self.calls = 0
        self.images = 0
        tower.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        pixels = args[0] if args else kwargs.get("pixel_values")
        self.calls += 1
        self.images += int(pixels.shape[0])


def _step_timer(trainer):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.starts, self.ends = [], []

        def on_step_begin(self, args, state, control, **kw):
            self.starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    timer = Timer()
    trainer.add_callback(timer)
    return timer


def _common(spec: dict, out_dir: str) -> dict:
    return dict(output_dir=out_dir, per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
                learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                dataloader_num_workers=0, use_cpu=True)


def _lm_targets(model_dir: str) -> list[str]:
    from transformers import AutoModelForImageTextToText

    from preftune.engine.kinds.vision import vision_lora_targets

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    for name, p in model.named_parameters():
        p.requires_grad_("language_model" in name)
    return vision_lora_targets(model, "all-linear")


def worker_preftune(spec: dict, out_dir: str) -> dict:
    from preftune.cli_args import parse_groups
    from preftune.train import setup

    t0 = time.perf_counter()
    flags = ["--model_name_or_path", spec["model_dir"], "--dataset", spec["data"], "--loss", "dpo", "--use_peft",
             "--max_length", "1024", "--learning_rate", "1e-4", "--max_steps", str(spec["steps"]),
             "--per_device_train_batch_size", str(spec["batch_size"]), "--logging_steps", "1",
             "--save_strategy", "no", "--report_to", "none", "--output_dir", out_dir, "--seed", "0",
             "--dataloader_num_workers", "0", "--use_cpu", "true"]
    groups = parse_groups(flags)
    import preftune.models.load as mv

    counter = {}
    original = mv.load_model

    def load_and_hook(*args, **kwargs):
        model = original(*args, **kwargs)
        counter["c"] = _VisionCounter(model.model.vision_tower)
        return model

    mv.load_model = load_and_hook  # looked up at call time by load_model_and_tokenizer: the hook sees every load
    run = setup(groups)
    reference_images, reference_calls = counter["c"].images, counter["c"].calls
    setup_s = time.perf_counter() - t0
    timer = _step_timer(run.trainer)
    _reset_peak_rss()
    counter["c"].images = counter["c"].calls = 0
    run.trainer.train()
    return _result("preftune", spec, timer, counter["c"], setup_s, reference_images, reference_calls,
                   time.perf_counter() - t0)


def worker_trl(spec: dict, out_dir: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    from preftune.data.vision import open_image

    t0 = time.perf_counter()
    rows = [json.loads(line) for line in open(spec["data"])]
    rows = [dict(r, images=[open_image(p) for p in r["images"]]) for r in rows]
    model = AutoModelForImageTextToText.from_pretrained(spec["model_dir"])
    processor = AutoProcessor.from_pretrained(spec["model_dir"])
    counter = _VisionCounter(model.model.vision_tower)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=_lm_targets(spec["model_dir"]),
                      task_type="CAUSAL_LM")
    args = DPOConfig(**_common(spec, out_dir))
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor,
                         peft_config=lora)
    setup_s = time.perf_counter() - t0
    timer = _step_timer(trainer)
    _reset_peak_rss()
    counter.images = counter.calls = 0
    trainer.train()
    return _result("trl", spec, timer, counter, setup_s, 0, 0, time.perf_counter() - t0)


def _result(tool, spec, timer, counter, setup_s, reference_images, reference_calls, total_s) -> dict:
    steps = len(timer.ends)
    timed = [e - s for s, e in zip(timer.starts[1:], timer.ends[1:])]  # after the warm-up step
    pairs_per_step = spec["batch_size"]
    train_pairs = steps * pairs_per_step
    return {
        "tool": tool, "steps": steps, "step_s": timed, "pairs_per_s": pairs_per_step / statistics.mean(timed)
        if timed else float("nan"),
        "setup_s": setup_s, "total_s": total_s, "peak_rss_train_mb": _status_kb("VmHWM") / 1024,
        "max_rss_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "vision_calls_train": counter.calls, "vision_images_train": counter.images,
        "image_encodings_per_image_train": counter.images / (2 * train_pairs),
        "vision_calls_reference": reference_calls, "image_encodings_per_image_reference":
            reference_images / (2 * spec["pairs"]) if reference_images else 0.0,
    }


def run_worker(tool: str, spec: dict, work: Path) -> dict:
    spec_file = work / f"spec-{tool}-{spec['round']}.json"
    out_file = work / f"out-{tool}-{spec['round']}.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               PREFTUNE_REF_CACHE=str(work / f"ref-cache-{spec['round']}"), HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", tool, "--spec", str(spec_file),
                           "--result", str(out_file)], env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(out_file.read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default=None, help="Working folder (default: a temporary one).")
    p.add_argument("--out", default=str(HERE / "results" / "bench_vlm.json"))
    p.add_argument("--worker", choices=("preftune", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        with tempfile.TemporaryDirectory() as out_dir:
            fn = worker_preftune if args.worker == "preftune" else worker_trl
            Path(args.result).write_text(json.dumps(fn(spec, out_dir)))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-vlm-"))
    model_dir, data = prepare(work, args.pairs)
    runs = []
    for r in range(args.rounds):
        order = ("preftune", "trl") if r % 2 == 0 else ("trl", "preftune")
        for tool in order:
            spec = {"model_dir": str(model_dir), "data": str(data), "pairs": args.pairs, "batch_size": args.batch_size,
                    "steps": args.steps, "round": r}
            runs.append(run_worker(tool, spec, work))
            print(f"round {r} {tool}: {runs[-1]['pairs_per_s']:.2f} pairs/s, peak RSS "
                  f"{runs[-1]['peak_rss_train_mb']:.0f} MB, {runs[-1]['image_encodings_per_image_train']:.2f} "
                  "encodings per image per step", flush=True)

    def median(tool, key):
        return statistics.median(x[key] for x in runs if x["tool"] == tool)

    summary = {key: {"preftune": median("preftune", key), "trl": median("trl", key)}
               for key in ("pairs_per_s", "peak_rss_train_mb", "max_rss_process_mb", "total_s",
                           "image_encodings_per_image_train", "image_encodings_per_image_reference")}
    ratios = {"throughput (preftune/TRL)": summary["pairs_per_s"]["preftune"] / summary["pairs_per_s"]["trl"],
              "peak RSS in training (preftune/TRL)": summary["peak_rss_train_mb"]["preftune"]
              / summary["peak_rss_train_mb"]["trl"],
              "total wall incl. setup (preftune/TRL)": summary["total_s"]["preftune"] / summary["total_s"]["trl"]}
    result = {"settings": vars(args), "runs": runs, "median": summary, "ratios": ratios,
              "cpu_count": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"median": summary, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
