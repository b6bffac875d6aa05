"""``fedseg check-data``: every broken kind in the corpus yields a one-line, actionable problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from broken_datasets import BROKEN, make_valid

from fedseg.data.demo import make_demo_data
from fedseg.data.validate import check_data_main, validate_dataset

REPO = Path(__file__).resolve().parents[1]


def test_valid_dataset_has_no_problems(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_valid(tmp_path / "ds")
    calls: list[tuple[int, int]] = []
    assert validate_dataset(root, progress=lambda done, total: calls.append((done, total))) == []
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]  # 3 training + 1 test case
    assert check_data_main(root) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {root}: 3 training cases, 1 test cases, 2 channel(s)")
    assert "organ=1" in out


def test_demo_data_is_valid(tmp_path: Path) -> None:
    for site in make_demo_data(tmp_path, sites=2, cases=2, test_cases=1):
        assert validate_dataset(site) == []


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_kind_is_reported(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    build, expected = BROKEN[kind]
    root = tmp_path / "ds"
    build(root)
    problems = validate_dataset(root)
    assert problems, f"{kind}: no problem found"
    assert any(expected in p for p in problems), f"{kind}: {expected!r} not in {problems}"
    for line in problems:
        assert "\n" not in line and "Traceback" not in line
        assert line.startswith(str(root)), f"{kind}: line does not name a path: {line}"
        assert "; " in line, f"{kind}: line does not say what to do: {line}"
    assert check_data_main(root) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and expected in captured.err


def test_not_a_directory(tmp_path: Path) -> None:
    (problem,) = validate_dataset(tmp_path / "nope")
    assert "not a directory" in problem and str(tmp_path / "nope") in problem


def _has_cli_command() -> bool:
    cli = REPO / "fedseg" / "cli.py"
    return cli.is_file() and "check-data" in cli.read_text()


@pytest.mark.skipif(not _has_cli_command(), reason="fedseg/cli.py has no check-data command yet")
@pytest.mark.parametrize("kind", ["truncated_gz", "undeclared_label_values"])
def test_cli_reports_without_traceback(kind: str, tmp_path: Path) -> None:
    build, expected = BROKEN[kind]
    root = tmp_path / "ds"
    build(root)
    proc = subprocess.run(
        [sys.executable, "-m", "fedseg.cli", "check-data", str(root)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and expected in proc.stderr
