"""Issue #14 point 3, the bundle side: a postprocessing decision recorded in a model bundle
(single and ensemble), applied by ``fedseg predict`` (``--no-postprocess`` skips it), decided
into the bundle by ``fedseg postprocess``, and scored at a site in the same pass as the
validation metrics (``evaluate_cases(postprocess_sums=...)``).

One tiny 3d_fullres model, trained 3 iterations: its label maps are noisy, with several
connected components, which is what the decision has to remove."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from inprocess_cli import fedseg
from scipy import ndimage
from test_ensemble import LABELS, _write_case

from fedseg.errors import FedsegError
from fedseg.training.postprocess import (
    DiceSums,
    Postprocessing,
    decide,
    keep_largest_component,
    variant_dice,
)

DEC = Postprocessing(keep_largest=[[1, 2], [2]])  # all foreground, then the lesion
GROUPS = {"1": [1], "2": [2]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ppbundle")
    site = root / "site"
    rng = np.random.default_rng(3)
    for i in range(5):  # 1 of 5 is the validation case
        _write_case(site, "Tr", f"c{i}", rng)
    for i in range(2):
        _write_case(site, "Ts", f"t{i}", rng)
    (site / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": LABELS, "file_ending": ".nii.gz",
        "numTraining": 5}))
    plan = root / "plan.json"
    assert fedseg("plan", str(site), "--out", str(plan), "--preset", "tiny").returncode == 0
    model = root / "model"
    res = fedseg("train", "--data", str(site), "--plan", str(plan), "--iterations", "3",
                 "--out", str(model), "--cache", str(root / "cache"), "--device", "cpu",
                 "--seed", "1")
    assert res.returncode == 0, res.stderr
    raw = root / "raw"
    res = fedseg("predict", "-m", str(model), "-i", str(site / "imagesTs"), "-o", str(raw),
                 "--device", "cpu", "--no-tta")
    assert res.returncode == 0, res.stderr
    assert "postprocessing: none decided for this bundle" in res.stderr
    return {"site": site, "model": model, "raw": raw, "cache": root / "cache", "plan": plan}


def _seg(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _components(seg: np.ndarray, values: list[int]) -> int:
    mask = np.isin(seg, values)
    return int(ndimage.label(mask, structure=np.ones((3,) * seg.ndim))[1])


def _copy(model: Path, to: Path) -> Path:
    shutil.copytree(model, to)
    return to


def test_predict_applies_the_bundles_decision_and_no_postprocess_skips_it(
    trained: dict[str, Path], tmp_path: Path,
) -> None:
    from fedseg.models.bundle_postprocessing import read_postprocessing, write_postprocessing

    model = _copy(trained["model"], tmp_path / "model")
    assert read_postprocessing(model) is None  # a bundle written before any decision
    raw = {p.name: _seg(p) for p in sorted(trained["raw"].glob("*.nii.gz"))}
    assert any(_components(s, [2]) > 1 for s in raw.values()), "no spurious component"

    before_info = json.loads((model / "bundle.json").read_text())
    write_postprocessing(model, DEC)
    info = json.loads((model / "bundle.json").read_text())
    assert info.pop("postprocessing") == {"keep_largest": [[1, 2], [2]]}
    assert info == before_info  # every other field kept
    assert not list(model.glob(".*tmp*"))  # the atomic write left nothing beside it

    out = tmp_path / "pp"
    res = fedseg("predict", "-m", str(model), "-i", str(trained["site"] / "imagesTs"),
                 "-o", str(out), "--device", "cpu", "--no-tta")
    assert res.returncode == 0, res.stderr
    assert ("postprocessing: keep the largest component of labels 1+2, then labels 2"
            in res.stderr)
    removed = 0
    for name, before in raw.items():
        after = _seg(out / name)
        assert _components(after, [1, 2]) <= 1 and _components(after, [2]) <= 1
        assert np.array_equal(after, keep_largest_component(
            keep_largest_component(before, [1, 2]), [2]))
        removed += int(((before > 0) & (after == 0)).sum())
        assert nib.load(str(out / name)).shape == before.shape
    assert removed > 0

    off = tmp_path / "off"
    res = fedseg("predict", "-m", str(model), "-i", str(trained["site"] / "imagesTs"),
                 "-o", str(off), "--device", "cpu", "--no-tta", "--no-postprocess")
    assert res.returncode == 0, res.stderr
    assert "postprocessing: off (--no-postprocess" in res.stderr
    for name, before in raw.items():
        assert np.array_equal(_seg(off / name), before)

    with pytest.raises(FedsegError, match=r"label value\(s\) \[7\] are not foreground"):
        write_postprocessing(model, Postprocessing(keep_largest=[[1, 7]]))
    write_postprocessing(model, None)  # removed again: an undecided bundle
    assert "postprocessing" not in json.loads((model / "bundle.json").read_text())


def test_ensemble_decision_survives_build_and_read_and_is_the_one_applied(
    trained: dict[str, Path], tmp_path: Path,
) -> None:
    from fedseg.models.bundle_postprocessing import read_postprocessing, write_postprocessing
    from fedseg.models.ensemble import build_ensemble, read_ensemble

    member = _copy(trained["model"], tmp_path / "member")
    write_postprocessing(member, Postprocessing(keep_largest=[[1]]))  # the member's own
    ens = build_ensemble({"a": member, "b": trained["model"]}, tmp_path / "ens",
                         postprocessing=DEC)
    info, _ = read_ensemble(ens)
    assert info.postprocessing == DEC and read_postprocessing(ens) == DEC
    # the member keeps its own decision in its folder; an ensemble of the ensemble starts undecided
    assert read_postprocessing(ens / "members" / "a") == Postprocessing(keep_largest=[[1]])
    assert read_postprocessing(build_ensemble([ens], tmp_path / "outer")) is None
    with pytest.raises(FedsegError, match="not foreground"):
        build_ensemble([member], tmp_path / "bad", postprocessing=Postprocessing(
            keep_largest=[[9]]))
    assert not (tmp_path / "bad").exists()

    ts = trained["site"] / "imagesTs"
    raw_ens = tmp_path / "raw_ens"
    res = fedseg("predict", "-m", str(ens), "-i", str(ts), "-o", str(raw_ens), "--device",
                 "cpu", "--no-tta", "--no-postprocess")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    res = fedseg("predict", "-m", str(ens), "-i", str(ts), "-o", str(out), "--device", "cpu",
                 "--no-tta")
    assert res.returncode == 0, res.stderr
    assert "(the bundle's decision)" in res.stderr
    changed = False
    for p in sorted(raw_ens.glob("*.nii.gz")):
        before, after = _seg(p), _seg(out / p.name)
        assert np.array_equal(after, DEC.apply(before))  # the ensemble's, not the member's
        changed |= not np.array_equal(before, after)
    assert changed

    # the ensemble beside another model: a combination nobody decided on, nothing applied
    loose = tmp_path / "loose"
    res = fedseg("predict", "-m", str(ens), "-m", str(member), "-i", str(ts), "-o", str(loose),
                 "--device", "cpu", "--no-tta")
    assert res.returncode == 0, res.stderr
    assert "postprocessing: not applied" in res.stderr and str(ens) in res.stderr
    for p in sorted(loose.glob("*.nii.gz")):  # members a, b, member: all the same model
        assert np.array_equal(_seg(p), _seg(raw_ens / p.name))

    write_postprocessing(ens, Postprocessing())  # decided: nothing to remove
    assert read_ensemble(ens)[0].postprocessing == Postprocessing()


def test_fedseg_postprocess_decides_into_the_bundle(trained: dict[str, Path],
                                                    tmp_path: Path) -> None:
    from fedseg.models.bundle_postprocessing import read_postprocessing, write_postprocessing
    from fedseg.training.postprocess_eval import site_sums

    model = _copy(trained["model"], tmp_path / "model")
    write_postprocessing(model, Postprocessing(keep_largest=[[2]]))  # an earlier decision
    res = fedseg("postprocess", "-m", str(model), str(trained["site"]), "--work",
                 str(tmp_path / "work"), "--json", str(tmp_path / "pp.json"), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "postprocessing written to" in res.stdout and "decided on 1 case(s)" in res.stdout
    dec = json.loads((tmp_path / "pp.json").read_text())
    assert read_postprocessing(model) == Postprocessing.model_validate(dec["postprocessing"])

    # the same decision from the sums of the raw predictions (the earlier decision not applied)
    sums = site_sums(trained["model"], trained["site"], tmp_path / "again", device="cpu")
    assert json.dumps(decide(sums, GROUPS)[1]) == json.dumps(dec["decision"])
    pred = next((tmp_path / "work" / "validation" / "site").glob("*.nii.gz"))
    ref = _seg(trained["site"] / "labelsTr" / pred.name)
    again = DiceSums.empty(GROUPS)
    again.add(variant_dice(_seg(pred), ref, GROUPS))
    assert again.to_vector().tolist() == sums.to_vector().tolist()

    res = fedseg("postprocess", "-m", str(tmp_path / "nope"), str(trained["site"]))
    assert res.returncode == 2 and "no such folder" in res.stderr


def test_evaluate_cases_adds_the_candidates_dice_from_the_same_prediction(
    trained: dict[str, Path],
) -> None:
    import torch

    from fedseg.models.bundle import load_bundle
    from fedseg.training.predict import load_network, predict_logits, segment
    from fedseg.training.preprocess import PreprocessedDataset, cache_folder
    from fedseg.training.validation import evaluate_cases

    plan, _, state, _ = load_bundle(trained["model"])
    net = load_network(plan, plan.default_configuration, state, trained["model"])
    ds = PreprocessedDataset(cache_folder(trained["cache"], plan))
    ids = ds.case_ids[:3]
    dev = torch.device("cpu")

    sums = DiceSums.empty(GROUPS)
    dice, _, _ = evaluate_cases(net, plan, ds, ids, dev, postprocess_sums=sums)
    assert dice == evaluate_cases(net, plan, ds, ids, dev)[0]  # old callers: same result

    alone = DiceSums.empty(GROUPS)
    with torch.no_grad():
        for cid in ids:
            data, seg, _ = ds.load(cid, mmap=False)
            logits = predict_logits(data, net, plan.config().patch_size, dev, mirror_tta=False)
            alone.add(variant_dice(segment(logits, plan.layout), np.where(seg[0] < 0, 0, seg[0]),
                                   GROUPS, plan.layout.ignore_label))
    np.testing.assert_allclose(sums.to_vector(), alone.to_vector(), rtol=0, atol=1e-12)
    assert max(sums.counts["none"]) == len(ids)
    for k, v in sums.means("none").items():  # the un-postprocessed candidate IS the metric
        assert v == pytest.approx(dice[k], abs=1e-6) or (np.isnan(v) and np.isnan(dice[k]))

    with pytest.raises(ValueError, match="classes"):
        evaluate_cases(net, plan, ds, ids[:1], dev, postprocess_sums=DiceSums.empty({"1": [1]}))


def test_fedseg_postprocess_on_an_ensemble_with_all_cases(trained: dict[str, Path],
                                                          tmp_path: Path) -> None:
    from fedseg.models.bundle_postprocessing import read_postprocessing
    from fedseg.models.ensemble import build_ensemble

    ens = build_ensemble([trained["model"], trained["model"]], tmp_path / "ens")
    res = fedseg("postprocess", "-m", str(ens), str(trained["site"]), "--all-cases",
                 "--work", str(tmp_path / "work"), "--json", str(tmp_path / "ens.json"),
                 "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "decided on 5 case(s)" in res.stdout  # all of imagesTr, not the fifth
    single = _copy(trained["model"], tmp_path / "single")
    res = fedseg("postprocess", "-m", str(single), str(trained["site"]), "--all-cases",
                 "--work", str(tmp_path / "work1"), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    # two copies of one model: the same label maps, so the same decision as the model alone
    assert read_postprocessing(ens) == read_postprocessing(single) is not None
    assert read_postprocessing(ens / "members" / "member_0") is None  # members untouched
