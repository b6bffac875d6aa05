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
