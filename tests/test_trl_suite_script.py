"""The pure parts of ``benchmarks/trl_suite.py`` (issue 22): the import rewrite of TRL's test files and
the counting of the two junit reports. No TRL snapshot, no pytest run: small inputs, well under a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import trl_suite  # noqa: E402


# ------------------------------------------------------------------------------------------------
# rewrite_imports: only the trainer / config names move to preftune.trl
# ------------------------------------------------------------------------------------------------
def test_rewrite_switches_the_trainer_and_config_lines_only():
    text = ("import torch\n"
            "from trl import DPOConfig, DPOTrainer\n"
            "from trl.trainer.dpo_trainer import DataCollatorForPreference, DataCollatorForVisionPreference\n"
            "from trl.experimental.cpo import CPOConfig, CPOTrainer\n"
            "from .testing_utils import TrlTestCase\n")
    new, n = trl_suite.rewrite_imports(text)
    assert n == 4
    assert new == ("import torch\n"
                   "from preftune.trl import DPOConfig, DPOTrainer\n"
                   "from trl.trainer.dpo_trainer import DataCollatorForPreference, DataCollatorForVisionPreference\n"
                   "from preftune.trl import CPOConfig, CPOTrainer\n"
                   "from .testing_utils import TrlTestCase\n")


def test_rewrite_splits_mixed_parenthesised_and_aliased_imports():
    text = ("def f():\n"
            "    from trl import (\n"
            "        ORPOConfig as Cfg,\n"
            "        ModelConfig,\n"
            "        RewardTrainer,\n"
            "    )\n"
            "    return Cfg\n")
    new, n = trl_suite.rewrite_imports(text)
    assert n == 2
    assert new == ("def f():\n"
                   "    from trl import ModelConfig\n"
                   "    from preftune.trl import ORPOConfig as Cfg, RewardTrainer\n"
                   "    return Cfg\n")


@pytest.mark.parametrize("line", ["from trl import ModelConfig, get_peft_config",
                                  "from trlx import DPOTrainer",  # another package
                                  "from preftune.trl import DPOTrainer",
                                  "# from trl import DPOTrainer"])
def test_rewrite_leaves_other_lines_alone(line):
    assert trl_suite.rewrite_imports(line + "\n") == (line + "\n", 0)


# ------------------------------------------------------------------------------------------------
# parse_junit / summarise: the counts and the failure-cause table
# ------------------------------------------------------------------------------------------------
def junit(cases: str) -> str:
    return f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>'


TRL_XML = junit(
    '<testcase classname="tests.test_dpo_trainer.TestDPO" name="test_a"/>'
    '<testcase classname="tests.test_dpo_trainer.TestDPO" name="test_b"/>'
    '<testcase classname="tests.test_dpo_trainer.TestDPO" name="test_c"/>'
    '<testcase classname="tests.test_dpo_trainer.TestDPO" name="test_d[x]"/>'
    '<testcase classname="tests.test_dpo_trainer.TestDPO" name="test_e">'
    '<skipped message="test requires bitsandbytes"/></testcase>'
    '<testcase classname="tests.experimental.test_cpo_trainer.TestCPO" name="test_f"/>'
    '<testcase classname="tests.test_dpo_trainer.TestDPO" name="test_g">'
    '<failure message="OSError: tiny-Gemma3 not built">tb</failure></testcase>')
PREFTUNE_XML = junit(
    '<testcase classname="tests.test_dpo_trainer.TestDPO" name="test_a"/>'
    '<testcase classname="tests.test_dpo_trainer.TestDPO" name="test_b">'
    '<failure message="preftune.errors.ConfigError: loss_type \'aot\' at 0x7f3a is not supported&#10;more">'
    'traceback</failure></testcase>'
    '<testcase classname="tests.test_dpo_trainer.TestDPO" name="test_c">'
    '<failure message="preftune.errors.ConfigError: loss_type \'aot\' at 0x99 is not supported">t</failure>'
    '</testcase>'
    '<testcase classname="tests.test_dpo_trainer.TestDPO" name="test_d[x]">'
    '<error message="failed on setup with &quot;fixture&quot;">setup\nE   KeyError: 12\nmore</error></testcase>'
    '<testcase classname="tests.test_dpo_trainer.TestDPO" name="test_e"><skipped message="s"/></testcase>'
    '<testcase classname="" name="tests.experimental.test_cpo_trainer">'
    '<error message="collection failure">Traceback\nE   ImportError: cannot import name \'X\'\n</error>'
    '</testcase>'
    '<testcase classname="tests.test_dpo_trainer.TestDPO" name="test_g"><failure message="m">t</failure></testcase>')


def test_parse_junit_outcomes_and_first_error_lines():
    trl = trl_suite.parse_junit(TRL_XML)
    assert trl["tests.test_dpo_trainer.TestDPO::test_a"] == ("passed", "")
    assert trl["tests.test_dpo_trainer.TestDPO::test_e"] == ("skipped", "test requires bitsandbytes")
    assert trl["tests.test_dpo_trainer.TestDPO::test_g"] == ("failed", "OSError: tiny-Gemma3 not built")
    pt = trl_suite.parse_junit(PREFTUNE_XML)
    assert pt["tests.test_dpo_trainer.TestDPO::test_b"][1] == \
        "preftune.errors.ConfigError: loss_type 'aot' at 0x7f3a is not supported"  # first line only
    assert pt["tests.test_dpo_trainer.TestDPO::test_d[x]"] == ("error", "KeyError: 12")  # the E line
    assert pt["::tests.experimental.test_cpo_trainer"] == ("error", "ImportError: cannot import name 'X'")


def test_summarise_counts_only_tests_passing_with_trl_and_groups_causes():
    summary = trl_suite.summarise(trl_suite.parse_junit(TRL_XML), trl_suite.parse_junit(PREFTUNE_XML))
    assert summary["collected"] == 7 and summary["skipped_trl"] == 1
    assert summary["passed_trl"] == 5  # a, b, c, d[x], f (g fails with TRL itself: not counted)
    assert summary["passed_preftune"] == 1 and summary["percent"] == 20.0
    assert summary["causes"] == [
        ("preftune.errors.ConfigError: loss_type 'aot' at <addr> is not supported", 2),  # two addresses, one cause
        ("KeyError: N", 1),
        ("collection error: ImportError: cannot import name 'X'", 1),  # test_f: its module did not import
    ]
    assert set(summary["failing"]) == {"tests.test_dpo_trainer.TestDPO::test_b",
                                       "tests.test_dpo_trainer.TestDPO::test_c",
                                       "tests.test_dpo_trainer.TestDPO::test_d[x]",
                                       "tests.experimental.test_cpo_trainer.TestCPO::test_f"}
    report = trl_suite.format_report(summary, {"commit": "abc", "preftune": "HEAD", "files": ["x.py"],
                                               "k": "", "date": "today"})
    assert "passed with TRL: 5" in report and "among those: 1 (20.0 %)" in report
    assert "| 2 | `preftune.errors.ConfigError: loss_type 'aot' at <addr> is not supported` |" in report


def test_a_test_missing_from_the_preftune_run_counts_as_not_run():
    trl = {"m.T::a": ("passed", ""), "m.T::b": ("passed", "")}
    summary = trl_suite.summarise(trl, {"m.T::a": ("passed", "")})
    assert (summary["passed_trl"], summary["passed_preftune"]) == (2, 1)
    assert summary["causes"] == [("not run", 1)]
