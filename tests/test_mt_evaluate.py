"""mt evaluate against the sacreBLEU command line on the shipped WMT'22 de->en outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.mt.cli import main
from preftune.mt.evaluate import evaluate_systems, system_name

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wmt"
HYPS = sorted((DATA / "wmt22-outputs-de-en").glob("*.en"))
pytestmark = pytest.mark.skipif(not HYPS, reason="shared WMT data not available")


@pytest.mark.slow
def test_evaluate_equals_sacrebleu_cli(tmp_path, capsys):
    refs = [r["translation"]["en"] for r in json.loads((DATA / "test.de-en.json").read_text())]
    ref_txt = tmp_path / "ref.en"
    ref_txt.write_text("".join(r + "\n" for r in refs), encoding="utf-8")
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref_txt), "-i", *map(str, HYPS),
                          "-m", "bleu", "chrf", "-f", "json", "-w", "6"],
                         capture_output=True, text=True, check=True)
    expected = {Path(s["system"]).stem: (s["BLEU"], s["chrF2"]) for s in json.loads(cli.stdout)}
    assert len(expected) == 6

    out = tmp_path / "scores.json"
    rc = main(["evaluate", "--pair", "de-en", "--refs", str(DATA / "test.de-en.json"),
               "--hyps", *map(str, HYPS), "--json", str(out)])
    assert rc == 0
    got = json.loads(out.read_text())
    assert set(got) == set(expected)
    for name, (bleu, chrf) in expected.items():
        assert f"{got[name]['bleu']:.6f}" == bleu, name
        assert f"{got[name]['chrf']:.6f}" == chrf, name
        assert "tok:13a" in got[name]["signature"]["bleu"]
    table = capsys.readouterr().out
    assert "| WMT_Winners | de-en | 33.45 |" in table and "sacreBLEU signature" in table


def test_several_pairs_and_errors(tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_text("the cat sat on the mat\na dog ran in the park\n")
    out = tmp_path / "m" / "deen"
    out.mkdir(parents=True)
    h1 = out / "test.de-en.en"
    h1.write_text("the cat sat on the mat\na dog ran in the park\n")
    h2 = tmp_path / "short.txt"
    h2.write_text("the cat\n")
    assert system_name(h1, "de", "en") == "m"
    res = evaluate_systems([("de-en", str(ref), [str(h1)]), ("en-de", str(ref), [str(h1)])])
    assert res["de-en"]["m"]["bleu"] == pytest.approx(100.0)
    assert set(res) == {"de-en", "en-de"}
    with pytest.raises(ValueError, match=r"short\.txt has 1 lines, references .*ref\.txt have 2"):
        evaluate_systems([("de-en", str(ref), [str(h2)])])
