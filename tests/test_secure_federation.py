"""Secure aggregation end to end (slow: ``pytest -m slow``): ``fedseg simulate`` with secure
aggregation on and off, same seed, real Flower processes on loopback.

The acceptance of the privacy issue: the same Dice curve within noise (the only difference is
the fixed-point rounding of the masked updates, ~1e-8 of the clip per value, which the chaotic
training then amplifies a little), the plan from the securely summed fingerprint equals
``fedseg plan`` over the same sites (integer-derived fields exactly, intensity statistics to
1e-9 relative), and the server's log holds no per-site training loss or case count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedseg.planning.cli_impl import plan_main
from fedseg.planning.plan import Plan

pytestmark = pytest.mark.slow

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
ENV.pop("FEDSEG_FAULT_INJECT", None)


def _simulate(out: Path, secure: str) -> list[dict]:
    res = subprocess.run(
        [sys.executable, "-m", "fedseg.cli", "simulate", "--sites", "3", "--rounds", "3",
         "--local-iterations", "20", "--eval-every", "1", "--out", str(out), "--device", "cpu",
         "--timeout", "540",
         "--seed", "0", "--secure-aggregation", secure],
        capture_output=True, text=True, timeout=660, env=ENV,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]


def _dice(recs: list[dict]) -> dict[int, float]:
    return {r["round"]: r["mean_dice"] for r in recs if r["phase"] == "eval" and r["site"] == "pooled"}


def _assert_plans_equal(fed: Plan, local: Plan) -> None:
    skip = {"dataset_name", "foreground_intensity_properties_per_channel"}
    assert fed.model_dump(exclude=skip) == local.model_dump(exclude=skip)
    for ch, props in fed.foreground_intensity_properties_per_channel.items():
        other = local.foreground_intensity_properties_per_channel[ch].model_dump()
        for key, val in props.model_dump().items():
            assert val == pytest.approx(other[key], rel=1e-9), key


def test_secure_equals_plain(tmp_path: Path) -> None:
    secure = _simulate(tmp_path / "on", "on")
    plain = _simulate(tmp_path / "off", "off")

    # the plan: secure fingerprint sum == fedseg plan over the pooled sites == plain federation
    fed = Plan.load(tmp_path / "on" / "run" / "plan.json")
    sites = [tmp_path / "on" / "demo-data" / s for s in ("siteA", "siteB", "siteC")]
    _assert_plans_equal(fed, plan_main(sites, tmp_path / "plan.json", preset="tiny"))
    _assert_plans_equal(fed, Plan.load(tmp_path / "off" / "run" / "plan.json"))

    # the Dice curve: identical untrained model, then equal within noise
    d_on, d_off = _dice(secure), _dice(plain)
    assert sorted(d_on) == sorted(d_off) == [0, 1, 2, 3], (d_on, d_off)
    assert d_on[0] == pytest.approx(d_off[0], abs=1e-9)
    for r in (1, 2, 3):
        assert abs(d_on[r] - d_off[r]) < 0.05, (r, d_on, d_off)
    assert d_on[3] > d_on[0] + 0.2, d_on

    # nothing per site about training in clear; pooled figures and secagg events instead
    train = [r for r in secure if r["phase"] == "train"]
    per_site = [r for r in train if r["site"] != "pooled"]
    assert len(per_site) == 9 and all(r["status"] == "ok" for r in per_site)
    assert all("loss" not in r and "cases" not in r for r in per_site)
    pooled = [r for r in train if r["site"] == "pooled"]
    assert [r["status"] for r in pooled] == ["ok"] * 3
    plain_pooled = [r for r in plain if r["phase"] == "train" and r["site"] == "pooled"]
    for a, b in zip(pooled, plain_pooled, strict=True):
        assert a["cases"] == b["cases"]
        assert a["secagg"]["num_clipped"] == 0 and a["secagg"]["dropped"] == []
    assert pooled[0]["loss"] == pytest.approx(plain_pooled[0]["loss"], abs=2e-3)
    enrol = [r for r in secure if r["phase"] == "enrol"]
    assert all(r.get("cases") is None for r in enrol)
    events = [r for r in secure if r["phase"] == "secagg"]
    assert any(e.get("step") == "unmask" and e.get("status") == "ok" for e in events)
    # per-round time, secure vs plain (reported; secure costs one extra exchange per round)
    print("round seconds secure", [r["seconds"] for r in pooled],
          "plain", [r["seconds"] for r in plain_pooled])
