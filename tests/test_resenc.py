"""nnU-Net's ResEnc M/L presets: plans equal to nnU-Net 2.8.1's, the network is nnU-Net's own.

Plans: ``tests/goldens/resenc.json`` holds ``nnUNetPlannerResEncM`` / ``nnUNetPlannerResEncL``
plans (``tools/make_nnunet_goldens.py --only resenc``) for the fingerprints the default-planner
goldens hold (demo, aniso_ct, big_mri, large_ct and 14 of the random ones), each at the
preset's own GPU target and a smaller one; fedseg plans the same per-case lists through its
histograms and must agree on every geometry field (``test_planner._compare_plans``) plus the
network class, the residual blocks per stage and the data identifier.

Network: a ``resenc_tiny`` plan of the demo data trains a few iterations on the CPU through
``fedseg train``, predicts through ``fedseg predict``, and its weights round-trip through
``weights_of`` / ``load_weights`` (~15 s).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
from inprocess_cli import fedseg
from test_planner import _compare_plans, _plan_dict

from fedseg.data.dataset_json import DatasetJson
from fedseg.models.network import aliases, build_network, forward_heads, load_weights, weights_of
from fedseg.planning.fingerprint import fingerprint_from_summaries
from fedseg.planning.plan import CASCADE, Plan
from fedseg.planning.planner import make_plan, plan_configurations
from fedseg.planning.planners import RESENC_L, RESENC_M, resenc_feature_map_size
from fedseg.planning.presets import PRESETS, planning_gpu_memory

GOLDEN = Path(__file__).parent / "goldens" / "resenc.json"
SPECS = {"nnUNetPlannerResEncM": RESENC_M, "nnUNetPlannerResEncL": RESENC_L}


def _fingerprint(d: dict):
    fg = [{c: np.array([1.0, 2.0, 3.0]) for c in d["channel_names"]}] * len(d["spacings"])
    return fingerprint_from_summaries(d["channel_names"], d["spacings"], d["shapes_after_crop"],
                                      d["relative_sizes"], fg)


def test_resenc_plans_equal_nnunet() -> None:
    g = json.loads(GOLDEN.read_text())
    seen: set[str] = set()
    for d in g["datasets"]:
        fp = _fingerprint(d)
        ds = DatasetJson(channel_names=d["channel_names"], labels=d["labels"])
        for planner, plans in d["plans"].items():
            spec = SPECS[planner]
            for gb, gp in plans.items():
                where = f"{d['source']} {planner} @ {gb} GB"
                ours = plan_configurations(fp, ds, gpu_memory_gb=float(gb), spec=spec)
                _compare_plans(ours, gp, where)
                plan = make_plan(fp, ds, gpu_memory_gb=float(gb), spec=spec)
                _compare_plans(_plan_dict(plan), gp, where + " (Plan)")
                for cname, gc in gp["configurations"].items():
                    if cname == CASCADE:
                        continue
                    oc = plan.configurations[cname]
                    assert oc.architecture == gc["network_class_name"] == "ResidualEncoderUNet"
                    assert oc.n_blocks_per_stage == gc["n_blocks_per_stage"], where
                    assert oc.data_identifier == gc["data_identifier"], (where, cname)
                    seen.add(cname)
    assert {"2d", "3d_fullres", "3d_lowres"} <= seen


def test_goldens_show_what_resenc_changes() -> None:
    """Guards against a silently easy golden: the presets differ from nnU-Net's default plan
    where nnU-Net's planners do (the blocks, the batch no longer capped at 5 % of the data)."""
    g = {d["source"]: d["plans"] for d in json.loads(GOLDEN.read_text())["datasets"]}
    default = json.loads((GOLDEN.parent / "big_mri.json").read_text())["plans"]["8"]
    m = g["big_mri"]["nnUNetPlannerResEncM"]["8"]["configurations"]["3d_fullres"]
    lg = g["big_mri"]["nnUNetPlannerResEncL"]["24"]["configurations"]["3d_fullres"]
    assert m["n_blocks_per_stage"][:4] == [1, 3, 4, 6]
    assert np.prod(lg["patch_size"]) > np.prod(m["patch_size"])  # L: a larger patch
    # M was tuned to need the default plan's memory: the same patch on big_mri...
    assert m["patch_size"] == default["configurations"]["3d_fullres"]["patch_size"]
    # ...but no 5 % cap on the batch: demo's default plan has batch 2, ResEnc M 19
    demo_default = json.loads((GOLDEN.parent / "demo.json").read_text())["plans"]["8"]
    demo_m = g["demo"]["nnUNetPlannerResEncM"]["8"]["configurations"]["3d_fullres"]
    assert demo_default["configurations"]["3d_fullres"]["batch_size"] == 2
    assert demo_m["batch_size"] == 19
    large = g["large_ct"]["nnUNetPlannerResEncM"]["8"]["configurations"]
    assert large["3d_lowres"]["data_identifier"] == "nnUNetResEncUNetMPlans_3d_lowres"


def test_feature_map_estimate_is_the_packages() -> None:
    """fedseg's transcription of ``compute_conv_feature_map_size`` equals the package's own
    (networks built on the meta device: no memory, no time), on the golden configurations."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    g = json.loads(GOLDEN.read_text())
    checked = 0
    for d in g["datasets"][:8]:
        for gp in d["plans"]["nnUNetPlannerResEncL"].values():
            for cname, c in gp["configurations"].items():
                if cname == CASCADE:
                    continue
                dim = len(c["patch_size"])
                with torch.device("meta"):
                    net = ResidualEncoderUNet(
                        1, c["n_stages"], c["features_per_stage"],
                        torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d, c["kernel_sizes"],
                        c["strides"], c["n_blocks_per_stage"], len(d["labels"]),
                        c["n_conv_per_stage_decoder"], conv_bias=True)
                theirs = int(net.compute_conv_feature_map_size(c["patch_size"]))
                ours = resenc_feature_map_size(c["patch_size"], c["strides"],
                                               c["features_per_stage"], c["n_blocks_per_stage"],
                                               c["n_conv_per_stage_decoder"], len(d["labels"]))
                assert ours == theirs, (d["source"], cname)
                checked += 1
    assert checked >= 16


def test_presets_and_gpu_targets(tmp_path: Path) -> None:
    from fedseg.cli import PRESETS as CLI_PRESETS
    from fedseg.server.config import JobConfig

    assert CLI_PRESETS == PRESETS == get_args(JobConfig.model_fields["plan_preset"].annotation)
    # the ResEnc presets plan for nnU-Net's targets whatever the sites report
    assert planning_gpu_memory("resenc_m", 40.0) == 8.0
    assert planning_gpu_memory("resenc_l", 11.0) == 24.0
    assert planning_gpu_memory("nnunet", 11.0) == 11.0
    res = fedseg("plan", str(tmp_path), "--out", str(tmp_path / "p.json"),
                 "--preset", "resenc_l", "--gpu-memory-gb", "8")
    assert res.returncode != 0 and "resenc_l" in res.stderr and "24 GB" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_plain_plans_keep_their_hash_and_resenc_fields_are_checked() -> None:
    d = json.loads(GOLDEN.read_text())["datasets"][1]  # aniso_ct
    fp, ds = _fingerprint(d), DatasetJson(channel_names=d["channel_names"], labels=d["labels"])
    plain, resenc = make_plan(fp, ds), make_plan(fp, ds, 8.0, spec=RESENC_M)
    assert "architecture" not in plain.canonical_json()  # PlainConvUNet: hash unchanged
    assert '"architecture":"ResidualEncoderUNet"' in resenc.canonical_json()
    assert resenc.hash() != plain.hash()
    cfg = resenc.configurations["3d_fullres"].model_dump()
    with pytest.raises(ValueError, match="n_blocks_per_stage"):
        type(resenc.configurations["3d_fullres"])(**{**cfg, "n_blocks_per_stage": [1, 3]})
    with pytest.raises(ValueError, match="n_conv_per_stage"):
        type(resenc.configurations["3d_fullres"])(**{**cfg, "n_conv_per_stage": [2] * 5})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("resenc")
    assert fedseg("demo-data", str(root / "data"), "--sites", "1", "--cases", "4",
                  "--test-cases", "1").returncode == 0
    site = root / "data" / "siteA"
    plan_path = root / "plan.json"
    res = fedseg("plan", str(site), "--out", str(plan_path), "--preset", "resenc_tiny")
    assert res.returncode == 0, res.stderr
    model = root / "model"
    res = fedseg("train", "--data", str(site), "--plan", str(plan_path), "--iterations", "3",
                 "--out", str(model), "--cache", str(root / "cache"), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    return site, plan_path, model


def test_tiny_resenc_trains_and_predicts(trained, tmp_path: Path) -> None:
    site, plan_path, model = trained
    plan = Plan.load(plan_path)
    cfg = plan.config()
    assert cfg.architecture == "ResidualEncoderUNet" and cfg.n_blocks_per_stage[:3] == [1, 3, 4]
    assert cfg.data_identifier.endswith("_tiny") and max(cfg.features_per_stage) <= 32
    assert json.loads((model / "bundle.json").read_text())["trained_iterations"] == 3
    res = fedseg("predict", "--model", str(model), "-i", str(site / "imagesTs"),
                 "-o", str(tmp_path / "pred"), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 1


def test_resenc_weights_round_trip_and_heads(trained) -> None:
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    _, plan_path, model = trained
    plan = Plan.load(plan_path)
    torch.manual_seed(0)
    net = build_network(plan)
    assert isinstance(net, ResidualEncoderUNet)
    w = weights_of(net)
    assert aliases(net) and not any(k.startswith("decoder.encoder.") for k in w)
    other = build_network(plan)
    load_weights(other, w)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 other.state_dict().values(), strict=True))
    load_weights(other, torch.load(model / "model.pt", weights_only=True))  # the bundle's
    cfg = plan.config()
    x = torch.randn(1, len(plan.channel_names), *cfg.patch_size)
    heads = forward_heads(net.train(), x)
    assert len(heads) == 1 + net.deep_supr_num == cfg.n_stages - 1
    assert heads[0].shape[2:] == x.shape[2:]  # full resolution first, then coarser
    assert all(a.shape[2] >= b.shape[2] for a, b in zip(heads, heads[1:], strict=False))
    with torch.no_grad():
        assert net.eval()(x).shape == (1, plan.num_outputs, *cfg.patch_size)


def test_report_names_the_residual_encoder(trained) -> None:
    from fedseg.server.report_data import settings

    plan = json.loads(trained[1].read_text())
    rows = dict(settings({"plan_preset": "resenc_tiny"}, plan, [], {}))
    assert rows["network"].startswith("nnU-Net's ResidualEncoderUNet, residual blocks per stage "
                                      "1-3-4-6"), rows["network"]
