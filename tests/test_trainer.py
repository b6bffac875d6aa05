"""Local training: poly LR, deep-supervision loss, sampling, augmentation, resume from disk."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.errors import FedsegError
from fedseg.planning.plan import ConfigurationPlan, IntensityProperties, Plan
from fedseg.training.augment import AugmentConfig, DeviceAugmenter, spatial_setup, warp
from fedseg.training.preprocess import (
    CaseProperties,
    PreprocessedCase,
    foreground_label_groups,
    sample_class_locations,
    save_preprocessed,
)
from fedseg.training.sampling import PatchSampler, get_bbox, num_foreground_samples
from fedseg.training.trainer import (
    STATE_FILE,
    DeepSupervisionLoss,
    DeepSupervisionNet,
    DiceCELoss,
    LocalTrainer,
    TrainConfig,
    deep_supervision_weights,
    poly_lr,
)

torch.set_num_threads(1)


def tiny_plan(patch: int = 16, features: tuple[int, ...] = (4, 8, 16)) -> Plan:
    n = len(features)
    cfg = ConfigurationPlan(
        data_identifier="tiny",
        spacing=[1.0, 1.0, 1.0],
        median_image_size_in_voxels=[24.0, 24.0, 24.0],
        patch_size=[patch] * 3,
        batch_size=2,
        normalization_schemes=["ZScoreNormalization"],
        use_mask_for_norm=[False],
        n_stages=n,
        features_per_stage=list(features),
        kernel_sizes=[[3, 3, 3]] * n,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        n_conv_per_stage=[2] * n,
        n_conv_per_stage_decoder=[2] * (n - 1),
        batch_dice=False,
    )
    props = IntensityProperties(
        mean=0, std=1, median=0, min=-1, max=1, percentile_00_5=-1, percentile_99_5=1
    )
    return Plan(
        dataset_name="Tiny",
        channel_names={"0": "MR"},
        labels={"background": 0, "organ": 1, "lesion": 2},
        num_training_cases=4,
        gpu_memory_gb=8,
        transpose_forward=[0, 1, 2],
        transpose_backward=[0, 1, 2],
        original_median_spacing_after_transp=[1.0, 1.0, 1.0],
        original_median_shape_after_transp=[24.0, 24.0, 24.0],
        foreground_intensity_properties_per_channel={"0": props},
        configurations={"3d_fullres": cfg},
    )


def write_cases(folder: Path, plan: Plan, n: int = 4, size: tuple[int, int, int] = (20, 24, 22)):
    """Learnable cases: a bright box (label 1) holding a brighter cube (label 2), -1 rim."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        seg = np.zeros((1, *size), np.int8)
        lo = rng.integers(2, 6, size=3)
        hi = [s - rng.integers(3, 7) for s in size]
        seg[0, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
        c = [(a + b) // 2 for a, b in zip(lo, hi, strict=True)]
        seg[0, c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2, c[2] - 2 : c[2] + 2] = 2
        seg[0, 0, :, :] = -1  # outside the body
        img = (seg.astype(np.float32).clip(0) + 0.3 * rng.standard_normal(seg.shape)).astype(
            np.float32
        )
        props = CaseProperties(
            case_id=f"c{i}", plan_hash=plan.hash(), config="3d_fullres", original_shape=list(size),
            original_spacing=[1, 1, 1], affine=np.eye(4).tolist(), spacing_transposed=[1, 1, 1],
            shape_before_cropping=list(size), bbox_used_for_cropping=[[0, s] for s in size],
            shape_after_cropping_and_before_resampling=list(size), target_spacing=[1, 1, 1],
            shape_after_resampling=list(size),
            class_locations=sample_class_locations(seg, foreground_label_groups(plan)),
        )
        save_preprocessed(folder, PreprocessedCase(img, seg, props))
    return folder


@pytest.fixture
def data(tmp_path: Path) -> tuple[Plan, Path]:
    plan = tiny_plan()
    return plan, write_cases(tmp_path / "pre", plan)


def cpu_config(**kw) -> TrainConfig:
    base = dict(device="cpu", num_workers=0, seed=3, total_iterations=100)
    base.update(kw)
    return TrainConfig(**base)


# ---- schedule and loss


def test_poly_lr_at_global_iteration():
    assert poly_lr(0.01, 0, 1000) == pytest.approx(0.01)
    assert poly_lr(0.01, 250, 1000) == pytest.approx(0.01 * 0.75**0.9)
    assert poly_lr(0.01, 1000, 1000) == 0.0
    assert poly_lr(0.01, 5000, 1000) == 0.0


def test_deep_supervision_weights_like_nnunet():
    w = deep_supervision_weights(4)
    assert w[-1] == 0
    assert sum(w) == pytest.approx(1)
    assert w[0] / w[1] == pytest.approx(2) and w[1] / w[2] == pytest.approx(2)
    assert deep_supervision_weights(1) == [1.0]


def test_deep_supervision_loss_on_tiny_net():
    plan = tiny_plan(patch=16, features=(4, 8, 8, 16))
    from fedseg.models.network import build_network

    torch.manual_seed(0)
    net = build_network(plan)
    model = DeepSupervisionNet(net).train()
    x = torch.randn(2, 1, 16, 16, 16)
    target = torch.randint(0, 3, (2, 1, 16, 16, 16))
    outs = model(x)
    # full resolution first, then each head at its own (coarser) resolution
    assert [tuple(o.shape[2:]) for o in outs] == [(16,) * 3, (8,) * 3, (4,) * 3]
    base = DiceCELoss(batch_dice=True)
    w = deep_supervision_weights(len(outs))
    loss = DeepSupervisionLoss(base, w)(outs, target)
    t1 = target[:, :, 1::2, 1::2, 1::2]  # nearest-exact at 1/2: voxel 2i+1 (as nnU-Net)
    expected = w[0] * base(outs[0], target) + w[1] * base(outs[1], t1)  # w[2] == 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert net.output_block.conv.conv.weight.grad is not None
    # the same network in eval mode returns the plain full-resolution output
    net.eval()
    assert net(x).shape == (2, 3, 16, 16, 16)


def test_dice_ce_ignores_outside_when_asked():
    logits = torch.randn(1, 3, 4, 4, 4)
    target = torch.randint(0, 3, (1, 1, 4, 4, 4))
    t2 = target.clone()
    t2[..., 0] = -1
    ign = DiceCELoss(batch_dice=False, ignore_index=-1)
    # changing only ignored voxels' logits does not change the loss
    l2 = logits.clone()
    l2[..., 0] += 5
    assert ign(logits, t2).item() == pytest.approx(ign(l2, t2).item(), rel=1e-5)


# ---- sampling and augmentation


def test_bbox_and_oversampling_rules():
    assert num_foreground_samples(2, 0.33) == 1
    assert num_foreground_samples(3, 0.33) == 1
    assert num_foreground_samples(1, 0.33) == 0
    rng = np.random.default_rng(0)
    locs = {"1": np.array([[10, 10, 10]]), "2": np.zeros((0, 3), int)}
    lo = get_bbox((30, 30, 30), (8, 8, 8), (0, 0, 0), rng, locs)
    assert lo == [6, 6, 6]
    for _ in range(50):  # a case smaller than the patch: box covers it, centred-ish, padded
        lo = get_bbox((5, 40, 40), (8, 8, 8), (0, 0, 0), rng, None)
        assert -3 <= lo[0] <= 0 and 0 <= lo[1] <= 32


def test_sampler_deterministic_padded_and_foreground(data):
    plan, folder = data
    setup = spatial_setup([32, 32, 32], AugmentConfig(), augment=True)  # larger than the cases
    s = PatchSampler(folder, setup, batch_size=2, augment=AugmentConfig(), seed=1)
    a, b = s.batch(7), s.batch(7)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    n = a["image"].shape[0] + a["image_big"].shape[0]
    assert n == 2
    if a["seg"].shape[0]:
        assert (a["seg"] == -1).any()  # padded (case is smaller than the patch)
    # the forced-foreground sample (last) contains foreground
    s2 = PatchSampler(folder, spatial_setup([16, 16, 16], AugmentConfig(), False), 2, seed=1)
    for i in range(10):
        bt = s2.batch(i)
        assert bt["image"].shape == (2, 1, 16, 16, 16) and bt["image_big"].shape[0] == 0
        assert (bt["seg"][1] > 0).any()


def test_warp_identity_is_centre_crop():
    img = torch.randn(1, 1, 20, 22, 24)
    seg = torch.randint(-1, 3, (1, 1, 20, 22, 24)).to(torch.int16)
    out, lab = warp(img, seg, torch.eye(3)[None], (16, 16, 16), num_labels=3)
    assert torch.allclose(out, img[:, :, 2:18, 3:19, 4:20], atol=1e-5)
    assert torch.equal(lab, seg[:, :, 2:18, 3:19, 4:20])


def test_device_augmenter_shapes_and_labels(data):
    plan, folder = data
    setup = spatial_setup([16, 16, 16], AugmentConfig(), augment=True)
    # force every transform on so all code paths run
    always = AugmentConfig(**{k: 1.0 for k in AugmentConfig.model_fields if k.startswith("p_")})
    s = PatchSampler(folder, setup, batch_size=2, augment=always, seed=0)
    aug = DeviceAugmenter(setup, num_labels=3, device=torch.device("cpu"))
    for i in range(2):
        img, seg = aug(s.batch(i))
        assert img.shape == (2, 1, 16, 16, 16) and seg.shape == (2, 1, 16, 16, 16)
        assert torch.isfinite(img).all()
        assert set(seg.unique().tolist()) <= {-1, 0, 1, 2}


# ---- trainer


def _momentum(tr: LocalTrainer) -> list[torch.Tensor]:
    # parameters of a zero-weighted deep-supervision head get no gradient, hence no buffer
    st = tr.optimizer.state
    return [st[p]["momentum_buffer"].clone() for p in tr.net.parameters() if p in st]


def test_resume_from_disk_matches_one_go(data, tmp_path: Path):
    plan, folder = data
    cfg = cpu_config()
    one = LocalTrainer(plan, folder, tmp_path / "one", cfg)
    r6 = one.train_iterations(None, 6, 0, 100)
    assert r6.iterations == 6 and r6.iteration == 6 and r6.num_cases == 4
    assert math.isfinite(r6.loss) and r6.iterations_per_s > 0
    assert r6.lr_first == pytest.approx(0.01) and r6.lr_last == pytest.approx(poly_lr(0.01, 5, 100))

    a = LocalTrainer(plan, folder, tmp_path / "split", cfg)
    a.train_iterations(None, 3, 0, 100)
    b = LocalTrainer(plan, folder, tmp_path / "split", cfg)  # fresh process: state from disk
    assert b.iteration == 3
    mom = _momentum(b)
    assert len(mom) > 0
    assert any(m.abs().sum() > 0 for m in mom)  # momentum restored, not fresh
    r = b.train_iterations(None, 3, 3, 100)
    assert r.iteration == 6
    for k, v in r6.weights.items():
        assert torch.allclose(v.float(), r.weights[k].float(), atol=1e-5), k
    for m1, m2 in zip(_momentum(one), _momentum(b), strict=True):
        assert torch.allclose(m1, m2, atol=1e-5)


def test_global_weights_are_loaded(data, tmp_path: Path):
    plan, folder = data
    tr = LocalTrainer(plan, folder, tmp_path / "s", cpu_config(augment=False))
    w = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in tr.weights().items()}
    r = tr.train_iterations(w, 1, 50, 100)
    assert r.lr_first == pytest.approx(poly_lr(0.01, 50, 100))
    with pytest.raises(FedsegError, match="do not fit"):
        tr.train_iterations({"nope": torch.zeros(1)}, 1, 0, 100)


def test_reset_momentum_starts_the_round_without_buffers(data, tmp_path: Path):
    plan, folder = data
    tr = LocalTrainer(plan, folder, tmp_path / "s", cpu_config(augment=False))
    tr.train_iterations(None, 2, 0, 100)
    w = tr.weights()
    kept = LocalTrainer(plan, folder, tmp_path / "s", cpu_config(augment=False))
    assert any(m.abs().sum() > 0 for m in _momentum(kept))  # kept on disk by default
    kept.train_iterations(w, 0, 2, 100)
    assert len(_momentum(LocalTrainer(plan, folder, tmp_path / "s", cpu_config()))) > 0
    kept.train_iterations(w, 0, 2, 100, reset_momentum=True)
    assert _momentum(LocalTrainer(plan, folder, tmp_path / "s", cpu_config())) == []
    r = kept.train_iterations(w, 1, 2, 100, reset_momentum=True)  # and trains on from there
    assert r.iteration == 3 and len(_momentum(kept)) > 0


def test_atomic_state_ignores_leftover_tmp(data, tmp_path: Path):
    plan, folder = data
    state = tmp_path / "s"
    state.mkdir()
    (state / (STATE_FILE + ".tmp")).write_bytes(b"half a file from a crash")
    tr = LocalTrainer(plan, folder, state, cpu_config(augment=False))
    assert tr.iteration == 0
    tr.train_iterations(None, 2, 0, 100)
    assert not (state / (STATE_FILE + ".tmp")).exists()
    assert LocalTrainer(plan, folder, state, cpu_config(augment=False)).iteration == 2
    (state / STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(FedsegError, match="unreadable"):
        LocalTrainer(plan, folder, state, cpu_config(augment=False))


def test_loss_drops_on_learnable_data(data, tmp_path: Path):
    plan, folder = data
    tr = LocalTrainer(plan, folder, tmp_path / "s", cpu_config(augment=False, total_iterations=60))
    first = tr.train_iterations(None, 10, 0, 60).loss
    tr.train_iterations(None, 40, 10, 60)
    last = tr.train_iterations(None, 10, 50, 60).loss
    assert last < 0.8 * first, (first, last)


def test_train_with_augmentation_runs(data, tmp_path: Path):
    plan, folder = data
    tr = LocalTrainer(plan, folder, tmp_path / "s", cpu_config(augment=True, ignore_outside=True))
    r = tr.train_iterations(None, 3, 0, 100, proximal_mu=0.01)  # FedProx term on
    assert math.isfinite(r.loss)


def test_bad_config_errors(data, tmp_path: Path):
    plan, folder = data
    with pytest.raises(FedsegError, match="multiple of 4"):
        LocalTrainer(plan, folder, tmp_path / "s", cpu_config(patch_size=[18, 16, 16]))
    with pytest.raises(FedsegError, match="no preprocessed"):
        LocalTrainer(plan, tmp_path / "missing", tmp_path / "s", cpu_config())
    with pytest.raises(FedsegError, match="not preprocessed: nope"):
        LocalTrainer(plan, folder, tmp_path / "s", cpu_config(), case_ids=["c0", "nope"])
    tr = LocalTrainer(plan, folder, tmp_path / "s", cpu_config(), case_ids=["c1", "c0"])
    assert tr.num_cases == 2 and tr.sampler.case_ids == ["c0", "c1"]


def test_spatial_and_mirror_keep_image_and_labels_aligned():
    # image == labels; with only rotation/scaling/mirroring on, they must still agree
    cfg = AugmentConfig(**{k: (1.0 if k in ("p_rotation", "p_scaling", "p_mirror_per_axis")
                               else 0.0) for k in AugmentConfig.model_fields if k.startswith("p_")})
    setup = spatial_setup([16, 16, 16], cfg, augment=True)
    big = setup.initial_patch_size
    seg = torch.zeros(2, 1, *big, dtype=torch.int16)
    seg[:, :, 8:-8, 10:-6, 9:-9] = 1
    seg[:, :, 14:-12, 14:-12, 13:-15] = 2
    rng = np.random.default_rng(0)
    from fedseg.training.augment import sample_params, sample_spatial

    mats = torch.tensor(np.stack([sample_spatial(rng, setup, cfg) for _ in range(2)]),
                        dtype=torch.float32)
    params = sample_params(rng, 2, 1, setup, cfg)
    batch = {
        "image": torch.zeros(0, 1, 16, 16, 16), "seg": torch.zeros(0, 1, 16, 16, 16,
                                                                   dtype=torch.int16),
        "image_big": seg.float(), "seg_big": seg, "matrices": mats, **params,
    }
    img, lab = DeviceAugmenter(setup, 3, torch.device("cpu"))(batch)
    inside = lab >= 0
    agree = (img.round()[inside] == lab[inside].float()).float().mean()
    assert agree > 0.95, agree
    assert (lab > 0).any()


def test_train_local_checkpoints_resumes_and_bundles(tmp_path: Path):
    from fedseg.data.demo import make_demo_data
    from fedseg.models.bundle import load_bundle
    from fedseg.training.single_site import train_local

    site = make_demo_data(tmp_path / "demo", sites=1, cases=2, test_cases=0)[0]
    plan = tiny_plan()
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "model"
    cfg = cpu_config(checkpoint_every=2)
    r = train_local(site, tmp_path / "plan.json", 3, out, config=cfg, progress=False)
    assert r.iterations == 3 and r.iteration == 3
    assert (site / ".fedseg_cache" / plan.hash() / "3d_fullres").is_dir()
    _, _, state, info = load_bundle(out)
    assert info.trained_iterations == 3
    # a longer run in the same folder continues from the checkpoint, LR over the new total
    r2 = train_local(site, tmp_path / "plan.json", 5, out, config=cfg, progress=False)
    assert r2.iterations == 2 and r2.iteration == 5
    assert r2.lr_first == pytest.approx(poly_lr(0.01, 3, 5))
    assert load_bundle(out)[3].trained_iterations == 5


def test_train_local_snapshots_and_init_from(tmp_path: Path):
    from fedseg.data.demo import make_demo_data
    from fedseg.models.bundle import load_bundle
    from fedseg.training.single_site import snapshot_dir, train_local

    site = make_demo_data(tmp_path / "demo", sites=1, cases=2, test_cases=0)[0]
    plan = tiny_plan()
    plan.save(tmp_path / "plan.json")
    cfg = cpu_config(augment=False)
    one = tmp_path / "one"
    train_local(site, tmp_path / "plan.json", 6, one, config=cfg, progress=False)
    snap = tmp_path / "snap"
    train_local(site, tmp_path / "plan.json", 6, snap, config=cfg, progress=False, snapshot_every=2)
    assert [load_bundle(snapshot_dir(snap, i))[3].trained_iterations for i in (2, 4)] == [2, 4]
    assert not snapshot_dir(snap, 6).exists()  # the last one is the bundle itself
    # snapshots cut the run into pieces of the SAME schedule: the final model is unchanged
    w1, w2 = load_bundle(one)[2], load_bundle(snap)[2]
    for k in w1:
        assert torch.allclose(w1[k].float(), w2[k].float(), atol=1e-5), k
    # fine-tuning starts from the given bundle's weights
    ft = tmp_path / "ft"
    r = train_local(site, tmp_path / "plan.json", 1, ft, config=cpu_config(augment=False, initial_lr=1e-9),
                    progress=False, init_from=one)
    for k in w1:
        assert torch.allclose(w1[k].float(), r.weights[k].float(), atol=1e-4), k
    other = tiny_plan(features=(4, 8, 8))
    other.save(tmp_path / "other.json")
    with pytest.raises(FedsegError, match="--init-from .*its plan"):
        train_local(site, tmp_path / "other.json", 1, tmp_path / "ft2", config=cfg, progress=False,
                    init_from=one)
    with pytest.raises(FedsegError, match="no such folder"):
        train_local(site, tmp_path / "plan.json", 1, tmp_path / "ft3", config=cfg, progress=False,
                    init_from=tmp_path / "nope")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_augment_and_step_never_wait_for_the_gpu(data, tmp_path: Path):
    """On CUDA the per-batch path (device augmentation with every transform on, bf16 step)
    must not block the host: a sync per step would idle the GPU while Python launches kernels."""
    import warnings

    from fedseg.training.sampling import DevicePrefetcher, _pin

    plan, folder = data
    tr = LocalTrainer(plan, folder, tmp_path / "s", TrainConfig(device="cuda", num_workers=0))
    always = AugmentConfig(**{k: 1.0 for k in AugmentConfig.model_fields if k.startswith("p_")})
    tr.sampler.augment = always
    batches = DevicePrefetcher(iter([_pin(tr.sampler.batch(i)) for i in range(3)]), tr.device)
    for i, batch in enumerate(batches):
        if i == 2:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                image, seg = tr.augmenter(batch)
                loss = tr.train_step(image, seg.clamp_min(0), 0.01)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        if i == 2:
            syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
            assert not syncs, syncs
    assert torch.isfinite(loss).item()


def test_mask_for_norm_channels_zeroed_outside(data):
    plan, folder = data
    setup = spatial_setup([16, 16, 16], AugmentConfig(), augment=False)
    s = PatchSampler(folder, setup, batch_size=2, seed=0)
    batch = s.batch(0)
    img, seg = DeviceAugmenter(setup, 3, torch.device("cpu"), mask_channels=[0])(batch)
    assert (seg < 0).any()
    assert (img[seg < 0] == 0).all()
    assert (img[seg >= 0] != 0).any()
