"""TRL's own trainer tests, run once with TRL and once with ``preftune.trl`` (issue 22).

    .venv/bin/python benchmarks/trl_suite.py /work/.mirror/huggingface+trl/repo            # bare git dir (HEAD)
    .venv/bin/python benchmarks/trl_suite.py ~/src/trl --only cpo -k "test_train"           # a checkout, a subset
    .venv/bin/python benchmarks/trl_suite.py SNAPSHOT --rev v1.9.0 --json /tmp/trl_suite.json

``SNAPSHOT`` is a TRL checkout or a bare git directory (the ``fetch`` tool's mirror); its test files
are extracted into ``--work`` (default ``/tmp/trl_suite``), never into this repository. The tests
are ``tests/test_dpo_trainer.py``, ``tests/test_reward_trainer.py`` and
``tests/experimental/test_{cpo,orpo}_trainer.py`` with TRL's ``conftest.py`` / ``testing_utils.py``.
Two copies are run with pytest (``-p no:cacheprovider``, a per-test timeout, ``--junitxml``):

* ``trl/``: the files as they are, against the installed TRL;
* ``preftune/``: the same files with the trainer / config classes (``DPOConfig``, ``DPOTrainer``,
  ``RewardConfig``, ``RewardTrainer``, ``CPOConfig``, ``CPOTrainer``, ``ORPOConfig``, ``ORPOTrainer``)
  imported from ``preftune.trl`` instead (:func:`rewrite_imports`); every other line unchanged.

Everything runs offline: the tiny models and datasets the tests load by Hub id are built once into
``--cache`` from the snapshot's own generator scripts (:mod:`trl_suite_offline`, which says how), and
a pytest plugin written next to the tests points the Hub ids there. The script prints the tests
collected, those passing with TRL, those of them passing with preftune (target ≥ 95 %), and the
failure causes of the rest (first line of each error, grouped).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import trl_suite_offline  # noqa: E402

FILES = {"dpo": "tests/test_dpo_trainer.py", "reward": "tests/test_reward_trainer.py",
         "cpo": "tests/experimental/test_cpo_trainer.py", "orpo": "tests/experimental/test_orpo_trainer.py"}
SUPPORT = ["tests/__init__.py", "tests/conftest.py", "tests/testing_utils.py", "tests/data",
           "tests/experimental/__init__.py"]
SWITCHED = {"DPOConfig", "DPOTrainer", "RewardConfig", "RewardTrainer", "CPOConfig", "CPOTrainer",
            "ORPOConfig", "ORPOTrainer"}
IMPORT_RE = re.compile(r"^([ \t]*)from (trl(?:\.[\w.]+)?) import (\([^)]*\)|[^\n]*)$", re.MULTILINE)


def rewrite_imports(text: str) -> tuple[str, int]:
    """Import the trainer / config classes of ``text`` from ``preftune.trl`` instead of ``trl``.

    Every ``from trl[.x.y] import ...`` statement (one line or parenthesised) that names one of
    :data:`SWITCHED` is split: those names (with any ``as`` alias) come from ``preftune.trl``, the
    others stay where they were. Returns the new text and the number of names switched.
    """
    switched = 0

    def one(match: re.Match) -> str:
        nonlocal switched
        indent, module, names = match.group(1), match.group(2), match.group(3)
        body = names.strip().strip("()")
        parts = [p.strip() for p in body.replace("\n", " ").split(",") if p.strip()]
        moved = [p for p in parts if p.split(" as ")[0].strip() in SWITCHED]
        if not moved:
            return match.group(0)
        kept = [p for p in parts if p not in moved]
        switched += len(moved)
        lines = [f"{indent}from {module} import {', '.join(kept)}"] if kept else []
        lines.append(f"{indent}from preftune.trl import {', '.join(moved)}")
        return "\n".join(lines)

    return IMPORT_RE.sub(one, text), switched


def _mask(line: str) -> str:
    """One error line with addresses, temporary paths and numbers masked, so equal causes group."""
    line = re.sub(r"0x[0-9a-fA-F]+", "<addr>", line)
    line = re.sub(r"(/tmp|/private)/\S+", "<tmp>", line)
    line = re.sub(r"(?<![\w.])-?\d+(\.\d+)?(e-?\d+)?", "N", line)
    return line[:200]


def parse_junit(xml_text: str) -> dict[str, tuple[str, str]]:
    """``{test id: (outcome, first error line)}`` of a pytest junit XML report.

    The outcome is ``passed``, ``failed``, ``error`` or ``skipped``; the test id is
    ``classname::name`` (the same on both sides, as both run from equal directory trees).
    """
    results = {}
    for case in ET.fromstring(xml_text).iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = _first_line(node.get("message") or "", node.text or "")
                break
        results[test_id] = (outcome, message)
    return results


def _first_line(message: str, text: str) -> str:
    """The first line of an error: junit's ``message``, or for pytest's generic messages ("collection
    failure", "failed on setup ...") the first ``E   `` line of the traceback text."""
    generic = not message.strip() or message.startswith(("collection failure", "failed on setup",
                                                         "failed on teardown"))
    if generic:
        for line in text.splitlines():
            if line.startswith("E   "):
                return line[4:].strip()
    lines = (message or text).strip().splitlines()
    return lines[0] if lines else ""


def _module_errors(results: dict[str, tuple[str, str]]) -> dict[str, str]:
    """``{dotted module: error line}`` of the modules that failed to collect (junit classname empty)."""
    return {t[2:]: m for t, (o, m) in results.items() if t.startswith("::") and o == "error"}


def summarise(trl: dict[str, tuple[str, str]], preftune: dict[str, tuple[str, str]]) -> dict:
    """Counts of the two runs: collected, passed with TRL, of those passed with preftune, the causes.

    ``causes`` lists ``(count, masked first error line)`` of the tests that pass with TRL but not
    with preftune (a test missing from the preftune run counts as ``not run``, or as its module's
    collection error), most frequent first, then alphabetical.
    """
    trl_passed = sorted(t for t, (o, _) in trl.items() if o == "passed")
    both = [t for t in trl_passed if preftune.get(t, ("missing", ""))[0] == "passed"]
    causes = Counter()
    failing = {}
    broken = _module_errors(preftune)
    for t in trl_passed:
        module = next((m for m in broken if t.startswith(m + ".")), None)
        missing = ("error", f"collection error: {broken[module]}") if module else ("missing", "not run")
        outcome, message = preftune.get(t, missing)
        if outcome != "passed":
            line = _mask(message) if message else outcome
            causes[line] += 1
            failing[t] = f"{outcome}: {message}"
    return {"collected": len(trl), "skipped_trl": sum(o == "skipped" for o, _ in trl.values()),
            "passed_trl": len(trl_passed), "passed_preftune": len(both),
            "percent": round(100.0 * len(both) / len(trl_passed), 1) if trl_passed else 0.0,
            "causes": sorted(causes.items(), key=lambda kv: (-kv[1], kv[0])), "failing": failing}


def extract_snapshot(source: Path, rev: str, dest: Path) -> str:
    """Copy the snapshot's ``tests/`` and ``scripts/`` into ``dest``; return its commit ("unknown" if none).

    ``source`` is a bare git directory or a checkout; a git one is read at ``rev`` with ``git archive``.
    """
    git_dir = source if (source / "objects").is_dir() and (source / "HEAD").is_file() else source / ".git"
    dest.mkdir(parents=True, exist_ok=True)
    if git_dir.exists():
        commit = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", rev], check=True,
                                capture_output=True, text=True).stdout.strip()
        archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", commit, "tests", "scripts"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return commit
    for sub in ("tests", "scripts"):
        shutil.copytree(source / sub, dest / sub, dirs_exist_ok=True)
    return "unknown"


def export_preftune(rev: str, dest: Path) -> Path:
    """``git archive`` this repository's ``src/`` at ``rev`` into ``dest``; returns the import root."""
    repo = HERE.parent
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "src"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def prepare_side(snapshot: Path, side: Path, files: list[str], switch: bool) -> int:
    """Write one side's test tree and plugin; returns the names switched to ``preftune.trl``."""
    if side.exists():
        shutil.rmtree(side)
    switched = 0
    for rel in SUPPORT + files:
        src, dst = snapshot / rel, side / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        elif src.exists():
            text = src.read_text()
            if switch and rel in files:
                text, n = rewrite_imports(text)
                switched += n
            dst.write_text(text)
    (side / "trl_suite_plugin.py").write_text(trl_suite_offline.PLUGIN)
    return switched


def run_side(side: Path, files: list[str], args, cache: Path) -> dict[str, tuple[str, str]]:
    """Run pytest on one side; returns :func:`parse_junit` of its report."""
    report = side / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "trl_suite_plugin", "-q",
           "--junitxml", str(report), "-o", "junit_family=xunit1", *files]
    if args.k:
        cmd += ["-k", args.k]
    if args.jobs > 1:
        cmd += ["-n", str(args.jobs)]
    path = [str(side)] + ([str(args.preftune_src)] if args.preftune_src else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), TRL_SUITE_CACHE=str(cache),
               TRL_SUITE_TIMEOUT=str(args.timeout), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_HUB_CACHE=str(cache / "hub"))
    with open(side / "pytest.log", "w") as log:
        subprocess.run(cmd, cwd=side, env=env, stdout=log, stderr=subprocess.STDOUT)
    if not report.exists():
        raise SystemExit(f"pytest wrote no report; see {side / 'pytest.log'}")
    return parse_junit(report.read_text())


def format_report(summary: dict, meta: dict) -> str:
    """The printed report: counts, then the failure-cause table (Markdown)."""
    lines = [f"snapshot {meta['commit']} · preftune {meta.get('preftune', '?')} · files {', '.join(meta['files'])} · -k {meta['k'] or '-'} · "
             f"{meta['date']}",
             f"tests collected: {summary['collected']} (skipped with TRL: {summary['skipped_trl']})",
             f"passed with TRL: {summary['passed_trl']}",
             f"passed with preftune.trl among those: {summary['passed_preftune']} ({summary['percent']} %)",
             "", "| tests | first error line (preftune.trl) |", "| ---: | --- |"]
    lines += [f"| {n} | `{cause.replace('|', '/')}` |" for cause, n in summary["causes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshot", type=Path, help="a TRL checkout or bare git directory")
    parser.add_argument("--rev", default="HEAD", help="commit of a git snapshot (default HEAD)")
    parser.add_argument("--only", choices=sorted(FILES), action="append", help="one test file (repeatable)")
    parser.add_argument("-k", default="", help="pytest -k expression")
    parser.add_argument("--jobs", type=int, default=1, help="pytest-xdist workers (if installed)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per test")
    parser.add_argument("--work", type=Path, default=Path("/tmp/trl_suite"))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "preftune-trl-suite")
    parser.add_argument("--side", choices=["both", "trl", "preftune"], default="both")
    parser.add_argument("--json", type=Path, help="write counts, causes and per-test outcomes here")
    parser.add_argument("--preftune-rev", default="",
                        help="test preftune as committed at this revision (git archive of src/ into --work) "
                             "instead of the working tree")
    args = parser.parse_args(argv)
    args.preftune_src, preftune = None, "working tree"
    if args.preftune_rev:
        args.preftune_src = export_preftune(args.preftune_rev, args.work / "preftune_src")
        preftune = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", args.preftune_rev],
                                  check=True, capture_output=True, text=True).stdout.strip()
    if args.jobs > 1:
        try:
            import xdist  # noqa: F401
        except ImportError:
            print("pytest-xdist is not installed: running with one worker", file=sys.stderr)
            args.jobs = 1
    files = [FILES[name] for name in (args.only or sorted(FILES))]
    snapshot = args.work / "snapshot"
    if snapshot.exists():
        shutil.rmtree(snapshot)
    commit = extract_snapshot(args.snapshot, args.rev, snapshot)
    cache = args.cache / commit[:12]
    build = trl_suite_offline.build_all(snapshot, cache)
    not_built = {k: v for k, v in build["models"].items() if not v.startswith("ok")}
    print(f"assets in {cache}: {len(build['models']) - len(not_built)} tiny models built, "
          f"{len(not_built)} not (see build.json)", flush=True)
    results = {}
    for side in ("trl", "preftune"):
        if args.side in (side, "both"):
            switched = prepare_side(snapshot, args.work / side, files, switch=side == "preftune")
            if side == "preftune":
                print(f"names switched to preftune.trl: {switched}", flush=True)
            results[side] = run_side(args.work / side, files, args, cache)
            print(f"{side}: {Counter(o for o, _ in results[side].values())}", flush=True)
    meta = {"commit": commit, "preftune": preftune, "files": [Path(f).name for f in files], "k": args.k,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if len(results) == 2:
        summary = summarise(results["trl"], results["preftune"])
        print(format_report(summary, meta))
    else:
        summary = {}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "summary": summary, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
