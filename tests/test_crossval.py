"""Issue #14 points 1 and 3: federated cross-validation and model selection. ``fold_split`` gives
every case to exactly one fold's validation. A real federation (``fedseg simulate``: Flower
processes on loopback, secure aggregation on, per-site metrics off) with 2 folds of two
configurations trains the four models, scores each fold on its validation cases through the
secure sum only, chooses among 2d, 3d_fullres and their ensemble on pooled CV Dice from the
sites' kept CV predictions, decides postprocessing, and ``fedseg predict`` with the chosen
bundle equals the mean of its fold models' probabilities. (The one-configuration 2-fold job:
the slow test.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from inprocess_cli import fedseg

from fedseg.data.splits import fold_split

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
ENV.pop("FEDSEG_FAULT_INJECT", None)


def _simulate(out: Path, *args: str) -> tuple[Path, list[dict]]:
    """``fedseg simulate`` with 2 demo sites, 2 rounds x 3 iterations per model, secure
    aggregation on, per-site metrics off; (the run folder, its metrics records)."""
    res = subprocess.run(
        [sys.executable, "-m", "fedseg.cli", "simulate", "--sites", "2", "--rounds", "2",
         "--local-iterations", "3", "--out", str(out), "--device", "cpu", "--timeout", "900",
         "--per-site-metrics", "off", *args],
        capture_output=True, text=True, timeout=1000, env=ENV,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = out / "run"
    return run, [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("n,folds", [(10, 2), (10, 5), (7, 3), (2, 5)])
def test_fold_split_validates_every_case_once(n: int, folds: int) -> None:
    ids = [f"case_{i:03d}" for i in range(n)]
    vals = []
    for f in range(folds):
        train, val = fold_split(list(reversed(ids)), f, folds)  # order-independent
        assert sorted(train + val) == ids and not set(train) & set(val)
        assert (train, val) == fold_split(ids, f, folds)  # deterministic
        vals += val
    assert sorted(vals) == ids
    sizes = [len(fold_split(ids, f, folds)[1]) for f in range(folds)]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="folds are numbered"):
        fold_split(ids, folds, folds)


@pytest.mark.slow
def test_two_fold_federated_cv_writes_an_ensemble_of_its_folds(tmp_path: Path) -> None:
    from fedseg.training.ensemble_predict import case_probabilities

    out = tmp_path / "sim"
    run, recs = _simulate(out, "--eval-every", "1", "--folds", "2")

    # both folds trained, 2 rounds each, numbered on (fold 1's rounds are 3 and 4)
    ok = [r["round"] for r in recs if r["phase"] == "train" and r["site"] == "pooled"
          and r.get("status") == "ok"]
    assert ok == [1, 2, 3, 4]
    # no round failed: a fold's last round advertises no keys across the final evaluation
    assert not [r for r in recs if r["phase"] == "train" and r.get("status") != "ok"]
    folds = {r["fold"]: r for r in recs if r["phase"] == "fold"}
    assert sorted(folds) == [0, 1] and [folds[f]["round"] for f in (0, 1)] == [2, 4]
    # each fold scored on its own validation cases: the demo's 10 cases per site split 5 + 5
    assert [folds[f]["cases"] for f in (0, 1)] == [10, 10]
    cv = next(r for r in recs if r["phase"] == "cv")
    assert cv["cases"] == 20 and cv["folds_scored"] == [0, 1]
    for c, d in cv["dice"].items():
        assert d == pytest.approx((folds[0]["dice"][c] + folds[1]["dice"][c]) / 2, abs=1e-9)
    # per_site_metrics off: the server only ever saw pooled (securely summed) evaluations
    evals = [r for r in recs if r["phase"] == "eval" and "dice" in r]
    assert evals and all(r["site"] == "pooled" and r.get("secure_aggregation") for r in evals)
    assert {r.get("fold") for r in evals} == {0, 1}
    server_log = "\n".join(p.read_text(errors="replace") for p in (out / "logs").rglob("*")
                           if p.is_file() and "site" not in p.name)
    for site in ("siteA", "siteB"):
        assert f"'{site}': {{'dice'" not in server_log and f'"site": "{site}", "cases"' \
            not in server_log

    # the bundle: an ensemble of the two fold bundles
    info = json.loads((run / "model" / "bundle.json").read_text())
    assert info["kind"] == "ensemble"
    assert [m["name"] for m in info["members"]] == ["fold_0", "fold_1"]
    f0, f1 = run / "folds" / "fold_0", run / "folds" / "fold_1"
    w0 = (f0 / "model.pt").read_bytes()
    assert w0 != (f1 / "model.pt").read_bytes()  # two different models
    assert w0 == (run / "model" / "members" / "fold_0" / "model.pt").read_bytes()

    ts = out / "demo-data" / "siteA" / "imagesTs"
    p0 = case_probabilities([f0], ts, device="cpu")
    p1 = case_probabilities([f1], ts, device="cpu")
    pens = case_probabilities([run / "model"], ts, device="cpu")
    assert sorted(pens) == sorted(p0) and len(pens) >= 2
    pred = tmp_path / "pred"
    r = fedseg("predict", "-m", str(run / "model"), "-i", str(ts), "-o", str(pred),
               "--device", "cpu", "--no-postprocess")
    assert r.returncode == 0, r.stderr
    from fedseg.data.dataset import load_image

    for case in pens:
        mean = (p0[case] + p1[case]) / 2
        np.testing.assert_allclose(pens[case], mean, rtol=0, atol=1e-6)
        assert not np.allclose(p0[case], p1[case], atol=1e-4)
        written, _, _ = load_image(pred / f"{case}.nii.gz")
        assert np.array_equal(written[0], mean.argmax(0))


def test_federated_selection_among_configurations_and_their_ensemble(tmp_path: Path) -> None:
    from fedseg.data.dataset import load_image
    from fedseg.training.ensemble_predict import case_probabilities

    out = tmp_path / "sim"
    job = tmp_path / "job.toml"
    job.write_text('folds = 2\nconfigurations = ["3d_fullres", "2d"]\n')
    run, recs = _simulate(out, "--eval-every", "2", "--job-config", str(job))
    ok = [r["round"] for r in recs if r["phase"] == "train" and r["site"] == "pooled"
          and r.get("status") == "ok"]
    assert ok == list(range(1, 9))  # 2 configurations x 2 folds x 2 rounds, numbered on
    # each fold's mean update divides by that fold's training cases (5 + 5), summed securely
    # once with the fingerprint, not by a count sent each round
    assert json.loads((run / "secure_cases.json").read_text())["train_cases"] == [10, 10]
    pooled = [r for r in recs if r["phase"] == "train" and r["site"] == "pooled"]
    assert all(r["cases"] == 10 and "counts_per_round" not in r for r in pooled)
    assert not [r for r in recs if r["phase"] == "train" and r.get("status") != "ok"]
    folds = [(r["configuration"], r["fold"], r["round"], r["cases"]) for r in recs
             if r["phase"] == "fold"]
    assert folds == [("3d_fullres", 0, 2, 10), ("3d_fullres", 1, 4, 10), ("2d", 0, 6, 10),
                     ("2d", 1, 8, 10)]
    cvs = {r["configuration"]: r for r in recs if r["phase"] == "cv"}
    assert sorted(cvs) == ["2d", "3d_fullres"] and all(r["cases"] == 20 for r in cvs.values())

    # the selection: three candidates scored on all 20 cases, through the secure sum only
    sel = [r for r in recs if r["phase"] == "selection"]
    assert len(sel) == 1 and sel[0]["site"] == "pooled" and sel[0]["secure_aggregation"]
    cands = sel[0]["candidates"]
    assert sorted(cands) == ["2d", "3d_fullres", "3d_fullres+2d"] and sel[0]["cases"] == 20
    assert sel[0]["chosen"] == max(cands, key=lambda n: cands[n]["mean_dice"])
    for c in cands.values():  # real Dice, from the sites' kept predictions
        assert 0.0 < c["mean_dice"] < 1.0
    evals = [r for r in recs if r["phase"] in ("eval", "selection") and "dice" in r]
    assert all(r["site"] == "pooled" for r in evals)
    pp = [r for r in recs if r["phase"] == "postprocessing"]
    assert len(pp) == 1 and pp[0]["candidate"] == sel[0]["chosen"] and pp[0]["cases"] == 20
    assert set(pp[0]["report"]) == {"foreground", "classes"}

    # the chosen bundle: the mean of its configurations' fold models
    chosen = cands[sel[0]["chosen"]]["configurations"]
    for c in ("2d", "3d_fullres"):
        assert json.loads((run / "candidates" / c / "bundle.json").read_text())["kind"] == \
            "ensemble"
    folds_used = [run / "folds" / c / f"fold_{k}" for c in chosen for k in (0, 1)]
    ts = out / "demo-data" / "siteB" / "imagesTs"
    each = [case_probabilities([f], ts, device="cpu") for f in folds_used]
    pens = case_probabilities([run / "model"], ts, device="cpu")
    pred = tmp_path / "pred"
    r = fedseg("predict", "-m", str(run / "model"), "-i", str(ts), "-o", str(pred),
               "--device", "cpu", "--no-postprocess")
    assert r.returncode == 0, r.stderr
    for case in pens:
        mean = sum(p[case] for p in each) / len(each)
        np.testing.assert_allclose(pens[case], mean, rtol=0, atol=1e-5)
        written, _, _ = load_image(pred / f"{case}.nii.gz")
        assert np.array_equal(written[0], mean.argmax(0))


def test_job_rounds_are_numbered_on_across_the_models() -> None:
    from pydantic import ValidationError

    from fedseg.server.config import JobConfig, train_request_fields

    cfg = JobConfig(run_dir="r", rounds=3, local_iterations=10, folds=2,
                    configurations=["3d_fullres", "2d"])
    assert (cfg.models, cfg.total_rounds) == (4, 12)
    assert [cfg.model_of(r) for r in (1, 3, 4, 12)] == [(0, 1), (0, 3), (1, 1), (3, 3)]
    assert [cfg.fold_of(r)[0] for r in range(1, 13)] == [0] * 3 + [1] * 3 + [0] * 3 + [1] * 3
    f = train_request_fields(cfg, "h", 8, False)  # model 2 (2d, fold 0), its round 2
    assert (f["fold"], f["folds"], f["global_iteration_start"], f["global_total_iterations"]) \
        == (0, 2, 10, 30)
    with pytest.raises(ValidationError, match="needs cross-validation"):
        JobConfig(run_dir="r", configurations=["3d_fullres", "2d"])
    with pytest.raises(ValidationError, match="not both"):
        JobConfig(run_dir="r", folds=2, configuration="2d", configurations=["2d"])
    with pytest.raises(ValidationError, match="each configuration once"):
        JobConfig(run_dir="r", folds=2, configurations=["2d", "2d"])


def test_a_new_model_starts_afresh(tmp_path: Path) -> None:
    """Between two models the job resets what belongs to one model: weights (another seed),
    server optimiser, best Dice, and the secure sums' update-growth history — the fresh
    model's first steps are far larger than the previous one's last, and the growth check
    refused them against that history (and skipped the new fold's rounds)."""
    from fedseg.data.demo import make_demo_data
    from fedseg.planning.cli_impl import plan_main
    from fedseg.privacy.provision import provision
    from fedseg.server import secure_apply
    from fedseg.server.config import JobConfig
    from fedseg.server.job_context import JobContext
    from fedseg.server.phases import crossval
    from fedseg.server.phases.initial_model import initial_weights
    from fedseg.server.secure_state import SecureAggregation

    sites = make_demo_data(tmp_path / "data", sites=1, cases=2, test_cases=0)
    plan = plan_main(sites, tmp_path / "plan.json", preset="tiny")
    provision(tmp_path / "pki", ["siteA", "siteB", "siteC"])
    cfg = JobConfig(run_dir=str(tmp_path / "run"), rounds=2, folds=2,
                    configurations=["3d_fullres", "2d"], roster=str(tmp_path / "pki/roster.json"))
    ctx = JobContext.create(None, cfg, lambda _: None, net=object())  # type: ignore[arg-type]
    ctx.secure = SecureAggregation(cfg.roster, None, 10.0, "job", 1)
    ctx.state.model = 1  # fold 1 of 3d_fullres, as restored from a checkpoint
    crossval.use_plan(ctx, plan)
    assert ctx.plan is not None and ctx.plan.default_configuration == "3d_fullres"
    ctx.state.weights = initial_weights(ctx.plan, cfg.seed)
    secure_apply.history(ctx)["norms"] = [0.3] * 5
    ctx.opt.load_state_dict({"m": {"w": [1.0]}})
    ctx.state.best_dice, ctx.state.round = 0.7, 4
    first = ctx.state.weights

    crossval.start_next_model(ctx)  # model 2: fold 0 of the 2d configuration
    assert (ctx.state.model, ctx.fold, ctx.plan.default_configuration) == (2, 0, "2d")
    assert secure_apply.history(ctx)["norms"] == [] and not ctx.opt.m
    assert ctx.state.best_dice == -1.0 and ctx.state.round == 4
    assert set(ctx.state.weights) != set(first) or any(  # a 2d network, or other weights
        (ctx.state.weights[k] != first[k]).any() for k in first)
    assert crossval.fold_dir(ctx, 1, "2d") == tmp_path / "run" / "folds" / "2d" / "fold_1"
