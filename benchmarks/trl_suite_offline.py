"""Offline assets for ``trl_suite.py``: TRL's tiny test models and datasets, built locally from TRL's own
generator scripts in a snapshot, and the pytest plugin that points TRL's tests at them.

What is built, and how (nothing is downloaded, nothing is written into this repository):

* **Datasets** (``trl-internal-testing/zen``, ``zen-image``, ``zen-multi-image``, ``toolcall``,
  ``harmony``): the snapshot's ``scripts/generate_*_dataset.py`` run unchanged with
  ``push_to_hub=True``; ``DatasetDict.push_to_hub`` is replaced by ``save_to_disk`` under
  ``<cache>/datasets/<repo_id>/<config_name>``. The plugin replaces ``datasets.load_dataset`` so that
  these ids (config, ``split``, ``streaming``) load from there; any other id goes to the real function.
* **Models** (``trl-internal-testing/tiny-*``): every module of the snapshot's
  ``scripts/generate_tiny_models/`` runs with its Hub calls replaced: ``AutoTokenizer.from_pretrained``
  returns a **stand-in tokenizer** (below), ``GenerationConfig.from_pretrained`` a default generation
  config with the stand-in's special tokens, ``AutoConfig.from_pretrained`` of the few reference ids
  the scripts read (Qwen2.5, flan-t5-small, bart-base) a config of that model type with the reference's
  shape fields as published in their model cards, ``check_transformers_version`` / ``check_dtype_pattern`` /
  ``print_config_diff`` do nothing, and ``push_to_hub`` saves model, tokenizer and generation config
  into a Hugging Face hub-cache layout (``<cache>/hub/models--trl-internal-testing--tiny-X/``), read
  with ``HF_HUB_OFFLINE=1``. Scripts that need anything else from the Hub (the vision–language
  models' processors) fail and are listed as not built; their tests fail on both sides and so are not
  counted among the tests that pass with TRL.
* **The stand-in tokenizer**: the real tokenizers (Qwen2.5, Llama 3.2, ...) cannot be downloaded, so
  every tiny model gets the same byte-level BPE tokenizer (512 entries, trained with ``tokenizers`` on
  the zen texts), ChatML special tokens (``<|endoftext|>`` pad, ``<|im_start|>``, ``<|im_end|>`` EOS,
  no BOS, as Qwen2.5) and a ChatML chat template written here that renders ``tools``, ``tool_calls``
  and ``role: tool`` messages. The small vocabulary keeps the tiny models' LM heads cheap on CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from pathlib import Path

STANDIN_VOCAB = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}<|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- elif message.role == 'tool' %}<|im_start|>tool\n{{ message.content }}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n"
    "{%- if message.content is string %}{{ message.content }}"
    "{%- elif message.content %}{%- for part in message.content %}"
    "{%- if part.type == 'text' %}{{ part.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "<tool_call>{{ (call.function if call.function is defined else call) | tojson }}</tool_call>"
    "{%- endfor %}<|im_end|>\n"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
# Shape fields of the reference configs the generator scripts read with AutoConfig (from the model cards).
REFERENCE_CONFIGS = {
    "Qwen/Qwen2.5-32B-Instruct": ("qwen2", dict(hidden_size=5120, intermediate_size=27648, num_attention_heads=40,
                                                num_key_value_heads=8, num_hidden_layers=64, rope_theta=1e6,
                                                max_position_embeddings=32768, tie_word_embeddings=False)),
    "google/flan-t5-small": ("t5", dict(d_model=512, d_ff=1024, d_kv=64, num_heads=6, num_layers=8,
                                        num_decoder_layers=8, feed_forward_proj="gated-gelu",
                                        tie_word_embeddings=False)),
    "facebook/bart-base": ("bart", dict(d_model=768, encoder_layers=6, decoder_layers=6,
                                        encoder_attention_heads=12, decoder_attention_heads=12,
                                        encoder_ffn_dim=3072, decoder_ffn_dim=3072)),
}
DATASET_SCRIPTS = {
    "generate_zen_dataset": "trl-internal-testing/zen",
    "generate_zen_image_dataset": "trl-internal-testing/zen-image",
    "generate_zen_multi_image_dataset": "trl-internal-testing/zen-multi-image",
    "generate_toolcall_dataset": "trl-internal-testing/toolcall",
    "generate_harmony_dataset": "trl-internal-testing/harmony",
}
FAKE_SHA = "0" * 40


def build_standin_tokenizer(out_dir: Path, texts: list[str]):
    """Train the stand-in byte-level BPE on ``texts`` and save it to ``out_dir``; returns the tokenizer.

    Special tokens ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (EOS) take ids 0-2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=STANDIN_VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                 unk_token=None, bos_token=None)
    hf.chat_template = CHATML_TEMPLATE
    hf.save_pretrained(out_dir)
    return hf


def _corpus(snapshot: Path) -> list[str]:
    """The text lines of the snapshot's dataset generator scripts (string literals are enough for BPE)."""
    lines = []
    for path in sorted((snapshot / "scripts").glob("generate_*_dataset.py")):
        lines += [ln.strip() for ln in path.read_text().splitlines() if '"' in ln]
    return lines * 3


def build_datasets(snapshot: Path, cache: Path) -> dict[str, str]:
    """Run the snapshot's dataset generator scripts, saving every config under ``cache/datasets``.

    Returns ``{script: "ok" | error line}``.
    """
    from datasets import DatasetDict

    status = {}
    sys.path.insert(0, str(snapshot / "scripts"))
    original = DatasetDict.push_to_hub
    for script, repo_id in DATASET_SCRIPTS.items():
        def save(self, repo, config_name="default", **_):
            self.save_to_disk(str(cache / "datasets" / repo / config_name))
        DatasetDict.push_to_hub = save
        try:
            module = importlib.import_module(script)
            module.main(0.1, True, repo_id)
            status[script] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported per script
            status[script] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            DatasetDict.push_to_hub = original
    sys.path.remove(str(snapshot / "scripts"))
    return status


def _save_hub_layout(hub: Path, repo_id: str, model, tokenizer, generation_config) -> None:
    """Save into the hub-cache layout ``models--org--name/{refs/main, snapshots/<sha>/}``."""
    root = hub / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / FAKE_SHA
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(FAKE_SHA)
    model.save_pretrained(snap)
    if tokenizer is not None:
        tokenizer.save_pretrained(snap)
    if generation_config is not None:
        generation_config.save_pretrained(snap)


def build_models(snapshot: Path, cache: Path, tokenizer_dir: Path) -> dict[str, str]:
    """Run every module of the snapshot's ``scripts/generate_tiny_models`` with the Hub calls replaced.

    Returns ``{module: "ok -> repo_id" | error line}``.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    sys.path.insert(0, str(snapshot))
    common = importlib.import_module("scripts.generate_tiny_models._common")
    standin = AutoTokenizer.from_pretrained(tokenizer_dir)
    built: dict[str, str] = {}
    current: list[str] = []

    def push(model, tokenizer, generation_config, prefix=None, suffix=None, create_pr=None):
        name = model.__class__.__name__
        repo_id = f"trl-internal-testing/{prefix + '-' if prefix else ''}{name}{'-' + suffix if suffix else ''}"
        _save_hub_layout(cache / "hub", repo_id, model, tokenizer, generation_config)
        current.append(repo_id)

    def tokenizer_from(cls, *args, **kwargs):
        return tok_orig(str(tokenizer_dir))

    def generation_from(cls, *args, **kwargs):
        return GenerationConfig(eos_token_id=standin.eos_token_id, pad_token_id=standin.pad_token_id)

    def config_from(cls, name, *args, **kwargs):
        if name not in REFERENCE_CONFIGS:
            raise OSError(f"{name}: not available offline")
        model_type, fields = REFERENCE_CONFIGS[name]
        ids = dict(pad_token_id=standin.pad_token_id, eos_token_id=standin.eos_token_id,
                   decoder_start_token_id=standin.pad_token_id, vocab_size=len(standin))
        return AutoConfig.for_model(model_type, **{**fields, **ids, **kwargs})

    for attr in ("check_transformers_version", "check_dtype_pattern", "print_config_diff"):
        setattr(common, attr, lambda *a, **k: None)
    common.push_to_hub = push
    tok_orig, gen_orig, cfg_orig = (AutoTokenizer.from_pretrained, GenerationConfig.from_pretrained,
                                    AutoConfig.from_pretrained)
    AutoTokenizer.from_pretrained = classmethod(tokenizer_from)
    GenerationConfig.from_pretrained = classmethod(generation_from)
    AutoConfig.from_pretrained = classmethod(config_from)
    try:
        base = snapshot / "scripts" / "generate_tiny_models"
        for path in sorted(base.glob("for_*/*.py")):
            if path.name.startswith("_"):
                continue
            module = f"scripts.generate_tiny_models.{path.parent.name}.{path.stem}"
            current.clear()
            try:
                importlib.import_module(module)
                built[module] = "ok -> " + ", ".join(current) if current else "ran, nothing saved"
            except BaseException as exc:  # noqa: BLE001 - reported per script; SystemExit too
                first = str(exc).splitlines()[0][:160] if str(exc) else ""
                built[module] = f"{type(exc).__name__}: {first}"
    finally:
        AutoTokenizer.from_pretrained, GenerationConfig.from_pretrained = tok_orig, gen_orig
        AutoConfig.from_pretrained = cfg_orig
        sys.path.remove(str(snapshot))
    del transformers
    return built


def build_all(snapshot: Path, cache: Path) -> dict:
    """Build tokenizer, datasets and models into ``cache`` (once: a ``build.json`` there marks it done).

    Returns the build report (also written to ``cache/build.json``).
    """
    marker = cache / "build.json"
    if marker.exists():
        return json.loads(marker.read_text())
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = cache / "standin-tokenizer"
    with open(cache / "build.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        build_standin_tokenizer(tokenizer_dir, _corpus(snapshot))
        report = {"datasets": build_datasets(snapshot, cache),
                  "models": build_models(snapshot, cache, tokenizer_dir)}
    marker.write_text(json.dumps(report, indent=1))
    return report


PLUGIN = r'''
"""pytest plugin written by preftune's benchmarks/trl_suite.py: offline Hub ids, shims, per-test timeout."""
import os, signal
from pathlib import Path
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = os.path.join(os.environ["TRL_SUITE_CACHE"], "hub")
os.environ.setdefault("WANDB_DISABLED", "true")
import importlib.util
import pytest
import datasets
import trl.import_utils as _iu

# names the snapshot's tests/testing_utils.py imports that the installed TRL no longer has
for _name, _module in (("is_joblib_available", "joblib"),):
    if not hasattr(_iu, _name):
        setattr(_iu, _name, lambda _m=_module: importlib.util.find_spec(_m) is not None)

_ROOT = os.path.join(os.environ["TRL_SUITE_CACHE"], "datasets")
_real_load_dataset = datasets.load_dataset


def _local_load_dataset(path, name=None, *args, split=None, streaming=False, **kwargs):
    local = os.path.join(_ROOT, str(path), name or "default")
    if not os.path.isdir(local):
        return _real_load_dataset(path, name, *args, split=split, streaming=streaming, **kwargs)
    data = datasets.load_from_disk(local)
    if split is not None:
        data = data[split]
    if streaming:
        if isinstance(data, datasets.DatasetDict):
            return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in data.items()})
        return data.to_iterable_dataset()
    return data


datasets.load_dataset = _local_load_dataset


@pytest.fixture
def lazy_shared_datadir(request, tmp_path):
    """pytest-datadir's fixture (TRL's tests use it; the plugin may not be installed): a copy of the
    ``data`` folder beside the test module."""
    import shutil
    return Path(shutil.copytree(request.path.parent / "data", tmp_path / "data"))
_TIMEOUT = int(os.environ.get("TRL_SUITE_TIMEOUT", "300"))


class TestTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise TestTimeout(f"test ran longer than {_TIMEOUT} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
'''
