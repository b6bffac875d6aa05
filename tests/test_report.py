"""Issue #16 (the operator's view): the run report a clinician and an engineer can read.

One real tiny federation (``fedseg simulate``, 2 sites x 2 rounds, TensorBoard on, plain
aggregation so that the per-site losses are in the report too) makes the
run folder; the HTML report is then opened as a browser would get it (parsed with
``html.parser``): the per-class, per-site final table matches ``test_scores.json``, the plot is
inline and decodes as an image, nothing is loaded from elsewhere. ``fedseg report RUN_DIR``
redraws it; the TensorBoard event files hold the rounds of ``metrics.jsonl``. Small run folders
written by hand check what a real tiny run rarely shows: a class never found, an undefined
HD95 (missing and counted, never a distance) and drops with their reasons.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fedseg.errors import FedsegError
from fedseg.server import report_data, tracking
from fedseg.server.report import write_reports
from fedseg.server.report_plots import POOLED_COLOUR, site_colours
from fedseg.server.rundir import RunDir

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def fedseg(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "fedseg.cli", *args], capture_output=True,
                         text=True, timeout=timeout, env=ENV)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(run folder, the simulation's console output) of a real tiny federation (TensorBoard
    on where the package is: the test extra installs it)."""
    base = tmp_path_factory.mktemp("report")
    res = fedseg("demo-data", str(base / "data"), "--sites", "2", "--cases", "6",
                 "--test-cases", "2")
    assert res.returncode == 0, res.stderr
    res = fedseg("simulate", "--data", str(base / "data"), "--rounds", "2",
                 "--local-iterations", "4", "--eval-every", "1", "--out", str(base / "sim"),
                 "--device", "cpu", "--timeout", "480",
                 *(["--tensorboard"] if tracking.available() else []),
                 "--secure-aggregation", "off")  # per-site losses too; secure: test_federation
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return base / "sim" / "run", res.stdout


class Page(HTMLParser):
    """Tables (by id: rows of cell texts, header first), images and external references."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: dict[str, str] = {}
        self.external: list[str] = []
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("src", "href"):
            if (a.get(key) or "").startswith(("http:", "https:", "//")):
                self.external.append(a[key] or "")
        if tag in ("link", "script") and (a.get("src") or a.get("href")):
            self.external.append(a.get("src") or a.get("href") or "")
        if tag == "table":
            self._table = a.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images[a.get("id") or f"img{len(self.images)}"] = a.get("src") or ""

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def labels_of(run: Path) -> list[tuple[str, str]]:
    """(metrics key, name) of the plan's foreground classes: read, never assumed."""
    return report_data.class_names(json.loads((run / "plan.json").read_text()))


def test_html_report_has_per_class_per_site_table_and_inline_plot(sim: tuple[Path, str]) -> None:
    run, _ = sim
    page = parse(run / "report.html")
    assert not page.external, page.external  # one self-contained file
    classes = labels_of(run)
    assert classes
    final = page.tables["final"]
    head, rows = final[0], {r[0]: r for r in final[1:]}
    for _, name in classes:
        assert f"Dice {name}" in head and f"HD95 {name} (mm)" in head
    assert "HD95 missing" in head
    test = json.loads((run / "test_scores.json").read_text())
    assert set(rows) == {*test, "mean of sites"}
    for site, scores in test.items():
        assert rows[site][head.index("cases")] == str(scores["cases"])
        for key, name in classes:
            dice = scores["mean"][key]["Dice"]
            assert rows[site][head.index(f"Dice {name}")] == f"{dice:.3f}"
            hd = scores["mean"][key]["HD95"]
            cell = rows[site][head.index(f"HD95 {name} (mm)")]
            assert cell == ("missing" if hd is None else f"{hd:.2f}")
        assert rows[site][head.index("HD95 missing")] == str(
            scores["foreground_mean"]["HD95_missing"])
    # per round: one table per class, every site and the pool after rounds 0 (untrained), 1, 2
    text = (run / "report.html").read_text()
    for i, (_, name) in enumerate(classes):
        assert f"{name}: Dice and HD95 (mm) per site after each round" in text
        t = page.tables[f"rounds-{i}"]
        assert t[0] == ["round", *[f"{s} {m}" for s in ("siteA", "siteB", "pooled")
                                   for m in ("Dice", "HD95")]]
        assert [r[0] for r in t[1:]] == ["0", "1", "2"]
    settings = {r[0]: r[1] for r in page.tables["settings"][1:]}
    plan = json.loads((run / "plan.json").read_text())
    patch = plan["configurations"]["3d_fullres"]["patch_size"]
    assert settings["patch size (voxels)"] == " x ".join(str(p) for p in patch)
    assert settings["secure aggregation"] == "off"
    assert settings["differential privacy"] == "off"
    assert settings["rounds"] == "2 done of 2" and settings["local iterations per round"] == "4"
    assert "network" in settings and "spacing (mm)" in settings
    assert "trouble" not in page.tables  # a run without drops says so in a line
    assert "Drops, rejections and refusals: 0" in (run / "report.html").read_text()
    # the figure: inline, and a real image
    src = page.images["plots"]
    assert src.startswith("data:image/png;base64,")
    png = base64.b64decode(src.split(",", 1)[1], validate=True)
    from PIL import Image

    img = Image.open(io.BytesIO(png))
    img.verify()
    assert img.format == "PNG" and img.size[0] > 500 and img.size[1] > 500
    assert png == (run / "plots.png").read_bytes()
    md = (run / "report.md").read_text()
    assert "| site | cases | Dice " in md and "![" in md and "## Run settings" in md


def test_simulate_ends_with_the_report(sim: tuple[Path, str]) -> None:
    run, out = sim
    evals = [r for r in RunDir(run).read_metrics() if r.get("phase") == "eval"]
    assert evals and all(set(r["hd95_missing"]) == set(r["dice"]) for r in evals)  # counted
    assert f"report: {run / 'report.html'}" in out
    assert f"fedseg report {run}" in out
    for _, name in labels_of(run):  # the per-class, per-site test table
        assert f"Dice {name}" in out


def test_fedseg_report_redraws(sim: tuple[Path, str], tmp_path: Path) -> None:
    run, _ = sim
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "model", "test"))
    for name in ("report.html", "report.md", "plots.png"):
        (copy / name).unlink()
    res = fedseg("report", str(copy))
    assert res.returncode == 0, res.stderr
    assert str(copy / "report.html") in res.stdout
    for name in ("report.html", "report.md", "plots.png"):
        assert (copy / name).is_file(), name
    assert parse(copy / "report.html").tables == parse(run / "report.html").tables
    res = fedseg("report", str(tmp_path / "nope"))
    assert res.returncode == 2 and "no metrics.jsonl" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nope").exists()


def test_tensorboard_event_files_hold_the_rounds(sim: tuple[Path, str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tracking.available():
        pytest.skip("the tracking extra is not installed: pip install 'fedseg[tracking]'")
    run, _ = sim
    assert json.loads((run / "job.json").read_text())["tensorboard"] is True
    recs = RunDir(run).read_metrics()
    for site in ("siteA", "siteB", "pooled"):
        ea = EventAccumulator(str(run / "tensorboard" / site))
        ea.Reload()
        for key, name in labels_of(run):
            want = {r["round"]: r["dice"][key] for r in recs
                    if r.get("phase") == "eval" and r.get("site") == site}
            got = {e.step: e.value for e in ea.Scalars(f"Dice/{name}")}
            assert sorted(got) == [0, 1, 2]
            assert all(math.isclose(got[k], want[k], rel_tol=1e-6) for k in got)
    ea = EventAccumulator(str(run / "tensorboard" / "pooled"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("loss")] == [1, 2]
    # rebuilt, not appended: 'fedseg report --tensorboard' leaves one file per run
    res = fedseg("report", str(run), "--tensorboard")
    assert res.returncode == 0, res.stderr
    assert len(list((run / "tensorboard" / "pooled").glob("events.out.tfevents.*"))) == 1


def test_tensorboard_without_the_package_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    from fedseg.cli import main
    from fedseg.server.cli import load_server_config

    monkeypatch.setattr(tracking, "available", lambda: False)
    toml = tmp_path / "server.toml"
    toml.write_text('insecure = true\nhost = "127.0.0.1"\n[job]\nrun_dir = "run"\n'
                    "secure_aggregation = false\ntensorboard = true\n")
    with pytest.raises(FedsegError) as err:
        load_server_config(toml)
    assert "field 'job.tensorboard'" in str(err.value) and "fedseg[tracking]" in str(err.value)
    assert main(["simulate", "--tensorboard", "--out", str(tmp_path / "s")]) == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "fedseg[tracking]" in line, line
    assert not (tmp_path / "s").exists()  # refused before anything started


# ------------------------------------------------------------------ hand-written run folders
def _run_folder(root: Path, test_missing: bool, counted: bool = False) -> Path:
    """A finished 2-site run whose second class is never found; siteB dropped in round 2;
    ``counted``: the eval records count the cases without HD95, as the job logs them."""
    run = RunDir(root)
    (root / "plan.json").write_text(json.dumps({
        "dataset_name": "d", "labels": {"background": 0, "liver": 1, "tumour": 2},
        "channel_names": {"0": "CT"}, "num_training_cases": 8,
        "configurations": {"3d_fullres": {"patch_size": [64, 64, 32], "spacing": [1.0, 1.0, 2.5],
                                          "batch_size": 2, "n_stages": 5,
                                          "features_per_stage": [32, 64, 128, 256, 320],
                                          "normalization_schemes": ["CTNormalization"]}}}))
    (root / "job.json").write_text(json.dumps({"rounds": 2, "local_iterations": 10,
                                               "secure_aggregation": False,
                                               "dp": {"enabled": False}}))
    run.set_status(state="finished", phase="done", round=2, rounds=2)
    for site in ("siteA", "siteB"):
        run.log({"phase": "enrol", "site": site, "status": "ok", "round": 1})
    for rnd in (0, 1, 2):
        for site in ("siteA", "siteB", "pooled"):
            if site == "siteB" and rnd == 2:
                continue
            run.log({"phase": "eval", "round": rnd, "site": site, "cases": 2,
                     "dice": {"1": 0.5 + 0.1 * rnd, "2": 0.0},
                     "hd95": {"1": 9.0 - rnd, "2": float("nan")}, "mean_dice": 0.3,
                     **({"hd95_missing": {"1": 1, "2": 2}} if counted else {})})
    run.log({"phase": "train", "round": 2, "site": "siteB", "status": "dropped",
             "reason": "Flower error NODE_UNAVAILABLE: node lost"})
    if test_missing:
        site = {"cases": 2, "mean": {"1": {"Dice": 0.8, "HD95": 3.0, "HD95_missing": 0},
                                     "2": {"Dice": 0.0, "HD95": None, "HD95_missing": 2}},
                "foreground_mean": {"Dice": 0.4, "HD95": 3.0, "HD95_missing": 2}}
        (root / "test_scores.json").write_text(json.dumps({"siteA": site, "siteB": site}))
    return root


@pytest.mark.parametrize(("test_scores", "counted"), [(True, False), (False, False),
                                                     (False, True)])
def test_undefined_hd95_is_missing_and_counted(tmp_path: Path, test_scores: bool,
                                               counted: bool) -> None:
    root = _run_folder(tmp_path / "run", test_scores, counted)
    _, page_path = write_reports(root)
    page = parse(page_path)
    head, *rows = page.tables["final"]
    by = {r[0]: dict(zip(head, r, strict=True)) for r in rows}
    assert set(by) == ({"siteA", "siteB", "mean of sites"} if test_scores else {"siteA", "pooled"})
    assert by["siteA"]["Dice tumour"] == "0.000" and by["siteA"]["HD95 tumour (mm)"] == "missing"
    assert by["siteA"]["HD95 liver (mm)"] == ("3.00" if test_scores else "7.00")
    assert by["siteA"]["HD95 mean (mm)"] == by["siteA"]["HD95 liver (mm)"]  # not a diagonal
    assert by["siteA"]["HD95 missing"] == ("2" if test_scores else "3" if counted else "1")
    if counted:  # cases left out of a site's validation HD95 mean are said per round
        head, *rows = page.tables["rounds-0"]
        assert rows[0][head.index("siteA HD95")] == "9.00 (1 missing)"
        assert "HD95 missing: cases" in page_path.read_text()
    if test_scores:
        assert by["mean of sites"]["HD95 missing"] == "4"
    text = page_path.read_text()
    assert "tumour: Dice below 0.1 at every site: the model does not find it" in text
    assert page.tables["trouble"][1] == ["2", "train", "siteB", "dropped",
                                         "Flower error NODE_UNAVAILABLE: node lost"]
    assert "1 dropped" in text
    md = (root / "report.md").read_text()
    assert "| siteA |" in md and "missing" in md and "NODE_UNAVAILABLE" in md


def test_console_summary_and_colours(tmp_path: Path) -> None:
    from fedseg.simulate import report_summary

    root = _run_folder(tmp_path / "run", test_missing=False)
    out = report_summary(root)
    lines = out.splitlines()
    head = next(line for line in lines if line.startswith("site "))
    assert "Dice liver" in head and "HD95 tumour (mm)" in head
    assert any(line.startswith("siteA ") and "missing" in line for line in lines)
    assert "! tumour: Dice below 0.1 at every site" in out
    assert "\r" not in out and "\x1b" not in out  # reads the same in a log file
    assert out.splitlines()[-1].startswith(f"report: {root / 'report.html'}")
    assert site_colours(["siteB", "siteA"]) == site_colours(["siteA", "siteB"])
    assert site_colours(["x"])["pooled"] == site_colours(["a", "b", "c"])["pooled"] == POOLED_COLOUR


# ------------------------------------------------- cross-validation and model selection
CV_FOLDS = {("3d_fullres", 0): (2, 0.106, 0.008), ("3d_fullres", 1): (4, 0.413, 0.012),
            ("2d", 0): (6, 0.105, 0.007), ("2d", 1): (8, 0.0004, 0.010)}


def _cv_run_folder(root: Path, configurations: bool, test_scores: bool = True) -> Path:
    """A finished 2-fold run as the job logs it (values from a real tiny run): with
    ``configurations``, 3d_fullres and 2d, the selection among them (per-site records too) and
    postprocessing keeping the largest foreground and lesion components; without, the 3d_fullres
    folds only, and postprocessing naming the plan's configuration."""
    run = RunDir(root)
    confs = ["3d_fullres", "2d"] if configurations else []
    (root / "plan.json").write_text(json.dumps({
        "dataset_name": "d", "labels": {"background": 0, "liver": 1, "tumour": 2},
        "channel_names": {"0": "CT"}, "num_training_cases": 20,
        "configurations": {"3d_fullres": {"patch_size": [28, 32, 32], "batch_size": 2},
                           "2d": {"patch_size": [48, 48], "batch_size": 12}}}))
    (root / "job.json").write_text(json.dumps({
        "rounds": 2, "folds": 2, "configurations": confs, "local_iterations": 3,
        "secure_aggregation": True, "per_site_metrics": False, "dp": {"enabled": False}}))
    models = [k for k in CV_FOLDS if configurations or k[0] == "3d_fullres"]
    last = 2 * len(models)
    run.set_status(state="finished", phase="done", round=last, rounds=last)
    for site in ("siteA", "siteB"):
        run.log({"phase": "enrol", "site": site, "status": "ok", "round": 1})
    run.log({"phase": "eval", "round": 0, "site": "pooled", "cases": 10, "fold": 0,
             "dice": {"1": 0.071, "2": 0.013}, "hd95": {"1": 20.0, "2": 23.5}})
    for conf, fold in models:
        rnd, d1, d2 = CV_FOLDS[(conf, fold)]
        for r in (rnd - 1, rnd):
            run.log({"phase": "train", "round": r, "site": "pooled", "loss": 1.0 + r / 10})
        run.log({"phase": "eval", "round": rnd, "site": "pooled", "cases": 10, "fold": fold,
                 "dice": {"1": d1, "2": d2}, "hd95": {"1": 15.0, "2": 25.0}})
        run.log({"phase": "fold", "fold": fold, "folds": 2, "round": rnd,
                 "bundle": str(root / "folds" / conf / f"fold_{fold}"), "cases": 10,
                 "dice": {"1": d1, "2": d2}, "mean_dice": (d1 + d2) / 2,
                 **({"configuration": conf} if configurations else {})})
    run.log({"phase": "cv", "folds": 2, "folds_scored": [0, 1], "cases": 20,
             "dice": {"1": 0.2596, "2": 0.0103}, "mean_dice": 0.135,
             "fold_mean_dice": {"0": 0.057, "1": 0.213},
             **({"configuration": "3d_fullres"} if configurations else {})})
    if configurations:
        run.log({"phase": "cv", "folds": 2, "folds_scored": [0, 1], "cases": 20,
                 "configuration": "2d", "dice": {"1": 0.0526, "2": 0.0085}, "mean_dice": 0.031,
                 "fold_mean_dice": {"0": 0.056, "1": 0.005}})
        for site, v in (("siteA", 0.3), ("siteB", 0.5)):
            run.log({"phase": "selection", "site": site, "cases": 10,
                     "dice": {"2d/1": 0.04, "2d/2": 0.0, "3d_fullres/1": v, "3d_fullres/2": 0.1,
                              "3d_fullres+2d/1": 0.2, "3d_fullres+2d/2": 0.0,
                              "pp/foreground/1": 0.9}})
        run.log({"phase": "selection", "site": "pooled", "cases": 20, "chosen": "3d_fullres",
                 "secure_aggregation": True, "candidates": {
                     "2d": {"configurations": ["2d"], "dice": {"1": 0.0411, "2": 0.0094},
                            "mean_dice": 0.0252},
                     "3d_fullres": {"configurations": ["3d_fullres"],
                                    "dice": {"1": 0.3995, "2": 0.0063}, "mean_dice": 0.2029},
                     "3d_fullres+2d": {"configurations": ["3d_fullres", "2d"],
                                       "dice": {"1": 0.3521, "2": 0.0068}, "mean_dice": 0.17945}}})
    run.log({"phase": "postprocessing", "candidate": "3d_fullres", "cases": 20,
             "keep_largest": [[1, 2], [2]], "report": {
                 "foreground": {"before": 0.2029, "after": 0.2101, "applied": True},
                 "classes": {"1": {"before": 0.4101, "after": 0.4052, "applied": False},
                             "2": {"before": 0.0101, "after": 0.0151, "applied": True}}}})
    if test_scores:
        site = {"cases": 4, "mean": {"1": {"Dice": 0.744, "HD95": 3.78, "HD95_missing": 0},
                                     "2": {"Dice": 0.024, "HD95": 19.1, "HD95_missing": 0}},
                "foreground_mean": {"Dice": 0.384, "HD95": 11.4, "HD95_missing": 0}}
        (root / "test_scores.json").write_text(json.dumps({"siteA": site, "siteB": site}))
    return root


def _rows(page: Page, ident: str) -> list[dict[str, str]]:
    head, *rows = page.tables[ident]
    return [dict(zip(head, r, strict=True)) for r in rows]


def test_cv_report_shows_folds_selection_and_postprocessing(tmp_path: Path) -> None:
    root = _cv_run_folder(tmp_path / "run", configurations=True)
    res = fedseg("report", str(root))  # what an operator runs: the section is redrawn
    assert res.returncode == 0, res.stderr
    page = parse(root / "report.html")
    folds = _rows(page, "cv-folds")
    assert [(r["configuration"], r["fold"], r["rounds"]) for r in folds] == [
        ("3d_fullres", "0", "1-2"), ("3d_fullres", "1", "3-4"), ("2d", "0", "5-6"),
        ("2d", "1", "7-8")]
    assert folds[1] == {"configuration": "3d_fullres", "fold": "1", "rounds": "3-4",
                        "validation cases": "10", "Dice liver": "0.413", "Dice tumour": "0.012",
                        "Dice mean": "0.212"}  # the class names, never the label values
    cv = _rows(page, "cv")
    assert [(r["configuration"], r["Dice liver"], r["Dice tumour"], r["Dice mean"],
             r["validation cases"], r["folds scored"]) for r in cv] == [
        ("3d_fullres", "0.260", "0.010", "0.135", "20", "2 of 2"),
        ("2d", "0.053", "0.009", "0.031", "20", "2 of 2")]
    sel = _rows(page, "selection")
    assert [(r["candidate"], r["configurations"], r["Dice liver"], r["Dice mean"], r["chosen"])
            for r in sel] == [("2d", "2d", "0.041", "0.025", ""),
                              ("3d_fullres", "3d_fullres", "0.400", "0.203", "chosen"),
                              ("3d_fullres+2d", "3d_fullres + 2d", "0.352", "0.179", "")]
    per_site = _rows(page, "selection-sites")  # per-site records: mean over the classes
    assert [(r["site"], r["3d_fullres Dice mean"], r["2d Dice mean"]) for r in per_site] == [
        ("siteA", "0.200", "0.020"), ("siteB", "0.300", "0.020")]
    pp = _rows(page, "postprocessing")
    assert [list(r.values()) for r in pp] == [
        ["all foreground (mean Dice)", "0.203", "0.210", "yes"],
        ["liver (its Dice)", "0.410", "0.405", "no"], ["tumour (its Dice)", "0.010", "0.015", "yes"]]
    text = (root / "report.html").read_text()
    assert "Decision: keep the largest component of all foreground, tumour." in text
    assert "Cross-validation and model selection" in text
    # the final line names the selected ensemble; per-round rows name their model
    final_title = "Final result: the final model, the selected ensemble 3d_fullres (its 2 fold models)"
    assert final_title in text
    rounds = _rows(page, "rounds-1")
    assert [(r["round"], r["model"], r["pooled Dice"]) for r in rounds] == [
        ("0", "3d_fullres fold 0 (untrained)", "0.013"), ("2", "3d_fullres fold 0", "0.008"),
        ("4", "3d_fullres fold 1", "0.012"), ("6", "2d fold 0", "0.007"),
        ("8", "2d fold 1", "0.010")]
    assert [r["model"] for r in _rows(page, "loss")][2:4] == ["3d_fullres fold 1"] * 2
    assert ("3d_fullres fold 0: rounds 1-2; 3d_fullres fold 1: rounds 3-4; 2d fold 0: rounds "
            "5-6; 2d fold 1: rounds 7-8") in text
    settings = dict(page.tables["settings"][1:])
    assert settings["rounds"] == "8 done of 8: 4 models (2 configurations x 2 folds), 2 rounds each"
    assert settings["patch size (voxels)"] == "3d_fullres: 28 x 32 x 32; 2d: 48 x 48"
    md = (root / "report.md").read_text()
    assert md.index("## Cross-validation and model selection") < md.index("## Per round")
    for line in ("| 3d_fullres | 1 | 3-4 | 10 | 0.413 | 0.012 | 0.212 |",
                 "| 3d_fullres | 2 of 2 | 20 | 0.260 | 0.010 | 0.135 |",
                 "| 3d_fullres | 3d_fullres | 0.400 | 0.006 | 0.203 | chosen |",
                 "| all foreground (mean Dice) | 0.203 | 0.210 | yes |",
                 "| 4 | 3d_fullres fold 1 | 0.413 | 15.00 |",
                 f"## {final_title}", "### Model selection: each candidate on the pooled CV "
                 "predictions (20 cases)"):
        assert line in md, line


def test_cv_report_of_folds_alone(tmp_path: Path) -> None:
    """Folds without configurations: no configuration column, no selection, the folds'
    ensemble is the final model; without test scores the final table says whose validation
    it is."""
    root = _cv_run_folder(tmp_path / "run", configurations=False, test_scores=False)
    _, page_path = write_reports(root)
    page = parse(page_path)
    assert [list(r.values()) for r in _rows(page, "cv-folds")] == [
        ["0", "1-2", "10", "0.106", "0.008", "0.057"], ["1", "3-4", "10", "0.413", "0.012", "0.212"]]
    assert page.tables["cv-folds"][0][0] == "fold"
    assert _rows(page, "cv")[0]["Dice mean"] == "0.135"
    assert "selection" not in page.tables and "selection-sites" not in page.tables
    assert "Postprocessing, decided on 3d_fullres's pooled CV Dice (20 cases)" in \
        page_path.read_text().replace("&#x27;", "'")
    text = page_path.read_text()
    assert ("Final result: validation cases of the model fold 1 after round 4 (no test split "
            "scored); the final model is the ensemble of the 2 fold models") in text
    assert [r["model"] for r in _rows(page, "rounds-2")] == ["fold 0 (untrained)", "fold 0",
                                                             "fold 1"]
    assert dict(page.tables["settings"][1:])["rounds"] == "4 done of 4: 2 models (2 folds), 2 rounds each"


def test_run_without_cv_has_no_cv_section(tmp_path: Path) -> None:
    root = _run_folder(tmp_path / "run", test_missing=False, counted=True)
    md_path, page_path = write_reports(root)
    page = parse(page_path)
    text, md = page_path.read_text(), md_path.read_text()
    assert "Cross-validation" not in text and "Cross-validation" not in md
    assert not {"cv-folds", "cv", "selection", "postprocessing"} & set(page.tables)
    assert page.tables["rounds-0"][0] == ["round", "siteA Dice", "siteA HD95", "siteB Dice",
                                          "siteB HD95", "pooled Dice", "pooled HD95"]
    assert "rounds-note" not in text and "numbered on across" not in md
    assert "Final result: validation cases after round 2 (no test split scored)" in text
    assert dict(page.tables["settings"][1:])["rounds"] == "2 done of 2"
