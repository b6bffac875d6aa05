"""The quality harness (``bench/quality.py``), end to end.

Default: on tiny demo data with a tiny budget, every model (pooled, local-only per site,
federated through ``fedseg simulate`` with secure aggregation, federated + fine-tune) is trained
and scored on every site's test cases; every row and column of the tables is present and finite
(an HD95 that does not exist, for a structure predicted on one side only, is counted instead),
the budgets add up, a rerun resumes without training again.

``slow``: on the real hippocampus sites from ``../shared/data`` (skipped when absent), the
federated model is within 0.03 mean foreground Dice of the pooled one at the same budget.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "bench" / "quality.py"
HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "hippocampus"
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def harness(out: Path, data: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HARNESS), "--data", str(data), "--out", str(out / "work"),
         "--json", str(out / "q.json"), "--md", str(out / "q.md"), "--plot", str(out / "q.png"),
         *extra],
        capture_output=True, text=True, timeout=timeout, env=ENV,
    )


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def test_harness_on_demo_data_has_every_row_and_column(tmp_path: Path) -> None:
    from fedseg.data.demo import make_demo_data

    make_demo_data(tmp_path / "data", sites=3, cases=5, test_cases=1)
    res = harness(tmp_path, tmp_path / "data", "--budget", "12", "--rounds", "2", "--finetune", "2",
                  "--curve", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    q = json.loads((tmp_path / "q.json").read_text())
    sites = ["siteA", "siteB", "siteC"]
    expected = {"pooled", "federated", *[f"local {s}" for s in sites],
                *[f"federated+FT {s}" for s in sites]}
    assert set(q["scores"]) == expected
    for name, per_site in q["scores"].items():
        assert sorted(per_site) == sites, name
        for s in sites:
            assert per_site[s]["cases"] == 1
            assert set(per_site[s]["mean"]) == {"1", "2"}
            fg = per_site[s]["foreground_mean"]
            assert _finite(fg["Dice"]), (name, s)
            # HD95 has a value unless no class has one; those are counted, not invented
            assert _finite(fg["HD95"]) or fg["HD95_missing"] == 2, (name, s, fg)
            assert 0 <= fg["HD95_missing"] <= 2
    st = q["settings"]
    # the same budget: pooled iterations = sites x rounds x local iterations = sites x local-only
    assert st["budget_iterations"] == 12 and st["local_iterations"] == 2
    assert st["local_only_iterations"] * 3 == 12
    assert q["models"]["pooled"]["budget"] == q["models"]["federated"]["budget"] == 12 * st["batch_size"]
    assert st["training_cases"] == {"siteA": 4, "siteB": 4, "siteC": 4, "pooled": 12}
    assert st["secure_aggregation"] is True
    assert st["plan_data_identifier"] == st["federated_plan_data_identifier"]
    job = json.loads((tmp_path / "work" / "federated" / "run" / "job.json").read_text())
    assert job["secure_aggregation"] is True and job["local_iterations"] == 2
    for name in ("pooled", "federated"):  # curve: the snapshot half-way and the final model
        pts = q["curves"][name]
        assert [p["samples"] for p in pts] == [6 * st["batch_size"], 12 * st["batch_size"]], name
        assert all(_finite(p["pooled_test_dice"]) and p["cases"] == 3 for p in pts)
    md = (tmp_path / "q.md").read_text()
    for row in ("| pooled |", "| federated |", "| local siteA |", "| federated+FT siteC |",
                "| local-only, own site |", "| federated + FT, own site |"):
        assert row in md, row
    assert "| model | budget (samples) | siteA | siteB | siteC | mean |" in md
    assert (tmp_path / "q.png").stat().st_size > 1000
    # the federation scored its final model on each site's test case, as a per-site table
    assert (tmp_path / "work" / "federated" / "run" / "test_scores.json").is_file()

    again = harness(tmp_path, tmp_path / "data", "--budget", "12", "--rounds", "2", "--finetune",
                    "2", "--curve", "2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "train pooled: done before (skipped)" in again.stdout
    assert "federated: done before (skipped)" in again.stdout
    assert json.loads((tmp_path / "q.json").read_text())["scores"] == q["scores"]


def test_harness_refuses_a_budget_that_does_not_split(tmp_path: Path) -> None:
    from fedseg.data.demo import make_demo_data

    make_demo_data(tmp_path / "data", sites=2, cases=3, test_cases=1)
    res = harness(tmp_path, tmp_path / "data", "--budget", "7", "--rounds", "2", timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "quality: --budget 7 must be a multiple of sites x rounds (2 x 2) so every model trains "
        "the same number of steps"]


@pytest.mark.slow
@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason=f"real data not found at {HIPPOCAMPUS}")
def test_federated_matches_pooled_on_hippocampus(tmp_path: Path) -> None:
    res = harness(tmp_path, HIPPOCAMPUS, "--budget", "6000", "--rounds", "50", "--finetune", "0",
                  "--models", "pooled,federated", "--curve", "1", timeout=3600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    q = json.loads((tmp_path / "q.json").read_text())

    def mean_fg(name: str) -> float:
        per_site = q["scores"][name]
        return sum(s["foreground_mean"]["Dice"] for s in per_site.values()) / len(per_site)

    assert mean_fg("federated") >= mean_fg("pooled") - 0.03, (mean_fg("federated"), mean_fg("pooled"))
