"""Issue #2 acceptance: the site pipeline through the real CLI, end to end, on the demo data.

demo-data → check-data (each site) → plan (pooled, tiny preset for CPU) → train a few hundred
iterations → predict the held-out cases → evaluate. The trained model must beat an untrained one
(the same network, random weights, exported as a bundle) clearly on held-out Dice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "2", "FLWR_TELEMETRY_ENABLED": "0",
       "FLWR_DISABLE_UPDATE_CHECK": "1"}


def fedseg(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "fedseg.cli", *args], capture_output=True,
                         text=True, timeout=timeout, env=ENV)
    assert "Traceback" not in res.stderr, res.stderr
    return res


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    res = fedseg("demo-data", str(out), "--sites", "3", "--cases", "8", "--test-cases", "3")
    assert res.returncode == 0, res.stderr
    return out


def test_demo_data_passes_check_data(demo: Path) -> None:
    for site in ("siteA", "siteB", "siteC"):
        res = fedseg("check-data", str(demo / site))
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("OK:")


def test_train_predict_evaluate_beats_untrained(demo: Path, tmp_path: Path) -> None:
    import torch

    from fedseg.data.dataset import read_dataset_json
    from fedseg.models.bundle import BundleInfo, save_bundle
    from fedseg.models.network import build_network
    from fedseg.planning.plan import Plan

    plan_path = tmp_path / "plan.json"
    res = fedseg("plan", str(demo / "siteA"), str(demo / "siteB"), str(demo / "siteC"),
                 "--out", str(plan_path), "--preset", "tiny")
    assert res.returncode == 0, res.stderr
    plan = Plan.load(plan_path)
    assert plan.num_training_cases == 24

    site = demo / "siteA"
    model = tmp_path / "model"
    res = fedseg("train", "--data", str(site), "--plan", str(plan_path), "--iterations", "300",
                 "--out", str(model), "--cache", str(tmp_path / "cache"), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    for name in ("plan.json", "dataset.json", "model.pt", "bundle.json", "checkpoint.pt"):
        assert (model / name).is_file(), name

    torch.manual_seed(123)
    untrained = tmp_path / "untrained"
    save_bundle(untrained, plan, read_dataset_json(site), build_network(plan).state_dict(),
                BundleInfo(note="random init"))

    scores = {}
    for name, bundle in (("trained", model), ("untrained", untrained)):
        pred = tmp_path / f"pred_{name}"
        res = fedseg("predict", "--model", str(bundle), "-i", str(site / "imagesTs"),
                     "-o", str(pred), "--device", "cpu")
        assert res.returncode == 0, res.stderr
        assert len(list(pred.glob("*.nii.gz"))) == 3
        out_json = tmp_path / f"eval_{name}.json"
        res = fedseg("evaluate", "--pred", str(pred), "--labels", str(site / "labelsTs"),
                     "--json", str(out_json))
        assert res.returncode == 0, res.stderr
        res = json.loads(out_json.read_text())
        scores[name] = res["foreground_mean"]["Dice"]
        scores[f"{name}_organ"] = res["mean"]["1"]["Dice"]
    # 300 CPU iterations of nnU-Net's recipe learn the organ well; the small lesion needs more
    # (see BENCHMARKS.md), so the bar is on the organ and on the gap to the untrained model.
    assert scores["trained_organ"] > 0.7, scores
    assert scores["trained"] > scores["untrained"] + 0.3, scores


def test_train_resumes_from_checkpoint(demo: Path, tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.json"
    assert fedseg("plan", str(demo / "siteB"), "--out", str(plan_path),
                  "--preset", "tiny").returncode == 0
    model = tmp_path / "model"
    common = ["--data", str(demo / "siteB"), "--plan", str(plan_path), "--out", str(model),
              "--cache", str(tmp_path / "cache"), "--device", "cpu"]
    assert fedseg("train", *common, "--iterations", "6").returncode == 0
    first = json.loads((model / "bundle.json").read_text())["trained_iterations"]
    assert first == 6
    assert fedseg("train", *common, "--iterations", "10").returncode == 0
    assert json.loads((model / "bundle.json").read_text())["trained_iterations"] == 10


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    res = fedseg("plan", str(tmp_path / "nope"), "--out", str(tmp_path / "p.json"))
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1 and "nope" in res.stderr
    res = fedseg("predict", "--model", str(tmp_path), "-i", str(tmp_path), "-o", str(tmp_path / "o"))
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1
    res = fedseg("train", "--data", str(tmp_path), "--plan", str(tmp_path / "missing.json"),
                 "--iterations", "5", "--out", str(tmp_path / "m"))
    assert res.returncode != 0 and "missing.json" in res.stderr


def test_simulate_and_train_option_errors_are_one_line(demo: Path, tmp_path: Path) -> None:
    """Mistakes with the options this pipeline grew are refused at once, before any process
    starts, in one line naming the option or file and what to do."""
    res = fedseg("simulate", "--data", str(demo), "--sites", "5", "--out", str(tmp_path / "s"))
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [
        f"fedseg: error: --sites 5: {demo} holds only 3 site folder(s) (siteA, siteB, siteC); "
        "give --sites 3 or fewer"]
    bad = tmp_path / "job.toml"
    bad.write_text('site_momentum = "sometimes"\n')
    res = fedseg("simulate", "--data", str(demo), "--out", str(tmp_path / "s"), "--job-config", str(bad))
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1
    assert f"{bad}: field 'site_momentum'" in res.stderr
    bad.write_text('[job]\nrun_dir = "/elsewhere"\n')
    res = fedseg("simulate", "--data", str(demo), "--out", str(tmp_path / "s"), "--job-config", str(bad))
    assert res.returncode != 0 and "field 'run_dir' is set by fedseg simulate" in res.stderr
    res = fedseg("simulate", "--data", str(demo), "--out", str(tmp_path / "s"), "--job-config",
                 str(tmp_path / "none.toml"))
    assert res.returncode != 0 and "none.toml: job config file not found" in res.stderr
    res = fedseg("train", "--data", str(demo / "siteA"), "--plan", str(tmp_path / "p.json"),
                 "--iterations", "5", "--out", str(tmp_path / "m"), "--snapshot-every", "0")
    assert res.returncode != 0 and "--snapshot-every: must be >= 1, got 0" in res.stderr


def test_train_refuses_a_plan_of_another_dataset(demo: Path, tmp_path: Path) -> None:
    """A plan made for other labels is refused before preprocessing or training, naming the
    plan, the dataset.json and the field (it used to train and fail only at predict)."""
    plan = tmp_path / "plan.json"
    assert fedseg("plan", str(demo / "siteA"), "--out", str(plan), "--preset", "tiny").returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    ds = json.loads((demo / "siteA" / "dataset.json").read_text())
    ds["labels"] = {**ds["labels"], "extra": 3}
    (other / "dataset.json").write_text(json.dumps(ds))
    for d in ("imagesTr", "labelsTr"):
        (other / d).symlink_to(demo / "siteA" / d)
    res = fedseg("train", "--data", str(other), "--plan", str(plan), "--iterations", "5",
                 "--out", str(tmp_path / "m"), "--cache", str(tmp_path / "cache"))
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert f"{plan} does not fit {other / 'dataset.json'}: field 'labels'" in res.stderr
    assert "fedseg plan" in res.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "m").exists()


def test_predict_checks_its_paths_before_importing_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from fedseg.cli import main\n"
        f"rc = main(['predict', '--model', {str(tmp_path / 'nope')!r}, '-i', {str(tmp_path)!r},"
        f" '-o', {str(tmp_path / 'o')!r}])\n"
        "assert rc != 0\n"
        "assert 'torch' not in sys.modules, 'torch imported before the paths were checked'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=ENV)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == (f"fedseg: error: {tmp_path / 'nope'}: no such folder; give a "
                                  "fedseg model bundle folder (made by 'fedseg train' or a "
                                  "federated run)")
