"""The bad-input corpus (tests/data/bad/cases.yaml) through the CLI, and adversarial model files.

Every case must end `preftune train` with exit status 2 and one error line naming the file, the
record and the field (or the flag), with no traceback. The cases run in-process through
``preftune.cli.main`` (fast: a tiny model saved once per session); a few also run through a real
``preftune`` subprocess to prove the exit status and the absence of a traceback end to end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets  # noqa: F401  (imported before any capture: their log handlers bind to the session's stderr)
import pytest
import torch
import transformers  # noqa: F401
import yaml

from preftune.cli import main

BAD = Path(__file__).parent / "data" / "bad"
CASE_FILES = sorted(BAD.glob("cases*.yaml"))  # cases.yaml, cases_flags.yaml, ...: one corpus
CASES = [case for path in CASE_FILES for case in yaml.safe_load(path.read_text())]
LOCATION = re.compile(r"^(line|record) \d+$")
ERROR_PREFIX = "preftune train: error: "


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No Hub traffic in-process (HF_HUB_OFFLINE is read at import time, so the constants are set):
    a lookup of a Hub id fails at once instead of waiting for the network."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture(scope="session")
def bad_models(tiny_model_dir, tmp_path_factory):
    """Model directories that must be refused, built from the tiny test model."""
    root = tmp_path_factory.mktemp("bad-models")
    tiny = Path(tiny_model_dir)
    tokenizer_files = [p for p in tiny.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]

    def base(name: str, with_config: bool = True) -> Path:
        path = root / name
        path.mkdir()
        for p in tokenizer_files:
            shutil.copy(p, path)
        if with_config:
            shutil.copy(tiny / "config.json", path)
        return path

    pickle_dir = base("pickle-only")
    from safetensors.torch import load_file

    torch.save(load_file(str(tiny / "model.safetensors")), pickle_dir / "pytorch_model.bin")
    base("no-weights")
    (base("bad-config", with_config=False) / "config.json").write_text("{not json")
    remote = base("remote-code", with_config=False)
    shutil.copy(tiny / "model.safetensors", remote)  # weights present: only the custom code is missing
    marker = root / "remote-code-ran"
    (remote / "config.json").write_text(
        '{"model_type": "preftune_remote_test", "auto_map": {"AutoConfig": "configuration_remote.RemoteConfig", '
        '"AutoModelForCausalLM": "modeling_remote.RemoteModel"}}')
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n\n\n" \
           "class RemoteConfig(PretrainedConfig):\n    model_type = 'preftune_remote_test'\n"
    (remote / "configuration_remote.py").write_text(code)
    (remote / "modeling_remote.py").write_text(code)
    return {"model_pickle": str(pickle_dir), "model_noweights": str(root / "no-weights"),
            "model_badconfig": str(root / "bad-config"), "model_remote_code": str(remote),
            "remote_marker": str(marker)}


def _argv(case: dict, placeholders: dict, output_dir: Path) -> list[str]:
    def fill(text: str) -> str:
        return text.format(**placeholders, out=output_dir)

    if case.get("argv"):  # another sub-command (generate, score, evaluate, plot, mt ...): the whole command line
        return [fill(str(a)) for a in case["argv"]]
    argv = ["train"]
    if case.get("config"):
        argv.append(str(BAD / case["config"]))
    argv += ["--model_name_or_path", placeholders["model"], "--output_dir", str(output_dir), "--max_steps", "1",
             "--report_to", "none"]
    if case.get("file"):
        argv += ["--dataset", str(BAD / case["file"])]
    return argv + [fill(str(a)) for a in case.get("args", [])]


def _prefix(case: dict) -> str:
    """``preftune train: error: `` (``preftune mt: error: `` ...: the case's sub-command)."""
    return f"preftune {case['argv'][0]}: error: " if case.get("argv") else ERROR_PREFIX


def _check_message(case: dict, stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith(_prefix(case))]
    assert len(errors) == 1, f"expected one error line, got:\n{stderr[-3000:]}"
    message = errors[0].lower()
    wanted = list(case["expect"]) + ([case["file"]] if case.get("file") else [])
    missing = [fragment for fragment in wanted if str(fragment).lower() not in message]
    assert not missing, f"{case['id']}: {missing} not in: {errors[0]}"


@pytest.fixture(scope="module")
def placeholders(tiny_model_dir, bad_models):
    return {"bad": str(BAD), "model": tiny_model_dir, **bad_models}


def test_corpus_manifest():
    """The manifest is complete and honest: >= 30 cases, unique ids, every data file used and present,
    every data case names its record (or says the error is about the whole file)."""
    assert len(CASES) >= 30
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids))
    used = set()
    for case in CASES:
        assert case.get("expect"), case["id"]
        if case.get("file"):
            assert (BAD / case["file"]).is_file(), case["id"]
            if not case.get("whole_file"):
                assert any(LOCATION.match(str(f)) for f in case["expect"]), f"{case['id']}: no line/record N"
            used.add(case["file"])
        if case.get("config") and (BAD / case["config"]).exists():
            used.add(case["config"])
        for arg in [*case.get("args", []), *case.get("argv", [])]:
            used.update(name for name in re.findall(r"\{bad\}/([^#\s]+)", str(arg)) if (BAD / name).exists())
    unused = {p.name for p in BAD.iterdir()} - used - {p.name for p in CASE_FILES}
    assert not unused, f"files in tests/data/bad/ used by no case: {sorted(unused)}"


@pytest.mark.parametrize("case", [c for c in CASES if not c.get("env")], ids=lambda c: c["id"])
def test_bad_input(case, placeholders, tmp_path, capsys, monkeypatch):
    """In-process: exit status 2 (or the case's ``exit``), one line naming file / record / field (or
    flag), no traceback. ``free_bytes: N``: the output file system reports N bytes free (a full disk)."""
    monkeypatch.delenv("PREFTUNE_DEBUG", raising=False)
    if "free_bytes" in case:
        import preftune.outputs.space

        monkeypatch.setattr(preftune.outputs.space, "free_bytes", lambda directory: case["free_bytes"])
    status = main(_argv(case, placeholders, tmp_path / "out"))
    stderr = capsys.readouterr().err
    assert status == case.get("exit", 2), stderr[-3000:]
    _check_message(case, stderr)


@pytest.mark.parametrize("case", [c for c in CASES if c.get("env") or c.get("e2e")], ids=lambda c: c["id"])
def test_bad_input_subprocess(case, placeholders, tmp_path):
    """End to end through the console script: the real exit status and stderr."""
    script = Path(sys.executable).with_name("preftune")
    env = {k: v for k, v in os.environ.items() if k != "PREFTUNE_DEBUG"}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, **case.get("env", {}))
    proc = subprocess.run([str(script), *_argv(case, placeholders, tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == case.get("exit", 2), proc.stderr[-3000:]
    _check_message(case, proc.stderr)


# --------------------------------------------------------------------------------------------
# Adversarial model files (issue 9, item 6)
# --------------------------------------------------------------------------------------------
def test_pickle_weights_load_only_when_allowed(tiny_model_dir, bad_models):
    from preftune.config import ModelArguments
    from preftune.errors import ModelLoadError
    from preftune.models import load_model

    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(ModelArguments(model_name_or_path=bad_models["model_pickle"]))
    allowed = load_model(ModelArguments(model_name_or_path=bad_models["model_pickle"], allow_pickle_weights=True))
    reference = load_model(ModelArguments(model_name_or_path=tiny_model_dir))
    for (name, p), (_, q) in zip(allowed.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), name


def test_hub_loads_ask_for_safetensors_unless_pickle_allowed(monkeypatch):
    """A Hub id is not checked locally; ``use_safetensors=True`` makes transformers refuse pickle-only repos."""
    from transformers import AutoModelForCausalLM

    from preftune.config import ModelArguments
    from preftune.models import load_model

    seen = []

    def fake_from_pretrained(source, **kwargs):
        seen.append(kwargs.get("use_safetensors"))
        raise OSError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    for allow in (False, True):
        with pytest.raises(Exception, match="stop here"):
            load_model(ModelArguments(model_name_or_path="someorg/some-model", allow_pickle_weights=allow))
    assert seen == [True, None]


def test_trust_remote_code_off_by_default(bad_models):
    """Off unless asked for: the model's own Python file is never imported."""
    from preftune.cli_args import parse_groups
    from preftune.config import ModelArguments
    from preftune.errors import ModelLoadError
    from preftune.models import load_model_and_tokenizer

    assert ModelArguments().trust_remote_code is False
    assert parse_groups([])[0].trust_remote_code is False
    with pytest.raises(ModelLoadError, match="--trust_remote_code"):
        load_model_and_tokenizer(ModelArguments(model_name_or_path=bad_models["model_remote_code"]))
    assert not Path(bad_models["remote_marker"]).exists()


def test_remote_code_fixture_really_runs_when_trusted(bad_models, tmp_path, monkeypatch):
    """The check above could not pass by accident: trusted, the fixture's code does run (module
    cache redirected into tmp_path)."""
    import transformers.dynamic_module_utils as dynamic
    from transformers import AutoConfig

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    marker = Path(bad_models["remote_marker"])
    AutoConfig.from_pretrained(bad_models["model_remote_code"], trust_remote_code=True)
    assert marker.exists()
    marker.unlink()


# --------------------------------------------------------------------------------------------
# Decisions the corpus relies on: BOM accepted, CSV cells are text, identical pairs
# --------------------------------------------------------------------------------------------
GOOD = [{"prompt": "Q: 2+2?\nA:", "chosen": "4", "rejected": "NA"}, {"prompt": "Q: 0/0?\nA:", "chosen": "None", "rejected": "7"}]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_utf8_bom_accepted_and_csv_cells_kept_as_text(tmp_path, suffix):
    """A UTF-8 byte-order mark (Windows editors write one) is dropped, not an error; CSV answers
    such as ``4``, ``NA`` or ``None`` stay the strings written (no number / missing-value inference)."""
    import csv
    import io
    import json

    from preftune.data import load_raw

    if suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in GOOD)
    elif suffix == ".json":
        text = json.dumps(GOOD)
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(GOOD)
        text = buffer.getvalue()
    plain, bom = tmp_path / f"plain{suffix}", tmp_path / f"bom{suffix}"
    plain.write_bytes(text.encode())
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_raw(str(bom)).records == load_raw(str(plain)).records == GOOD


def _pair(same: bool, location: str):
    from preftune.types import TokenizedPair

    return TokenizedPair(prompt_ids=[1, 5], chosen_ids=[7, 2], rejected_ids=[7, 2] if same else [8, 2],
                         location=location)


def test_identical_pairs_counted_warned_and_all_identical_refused(caplog):
    from preftune.data import DataError
    from preftune.data.pipeline import check_preference_signal

    some = [_pair(False, "d.jsonl, line 1"), _pair(True, "d.jsonl, line 2"), _pair(True, "d.jsonl, line 3")]
    with caplog.at_level("WARNING", logger="preftune.data"):
        assert check_preference_signal(some, "cpo") == 2
    assert "2 of 3 training pairs" in caplog.text and "d.jsonl, line 2" in caplog.text
    every = [_pair(True, "d.jsonl, line 4"), _pair(True, "d.jsonl, line 5")]
    for loss in ("cpo", "dpo", "simpo", "orpo", "rm"):
        with pytest.raises(DataError, match=r"d\.jsonl, line 4, fields 'chosen' / 'rejected'"):
            check_preference_signal(every, loss)
    assert check_preference_signal(every, "sft") == 0  # SFT reads chosen only
