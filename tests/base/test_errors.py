"""Tests for rosmap_geneformer.errors: a refused input is one line and exit 2, a bug keeps its
traceback; checked in-process and with real stage-script and CLI processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rosmap_geneformer import errors
from rosmap_geneformer.errors import InputError, MissingInputError, MissingKeyError, run_stage

ROOT = Path(__file__).resolve().parents[2]


def _refuse(argv: list[str]) -> None:
    raise InputError("data/x.tsv: column 'subject' is empty; fill it in data/x.tsv.")


def _crash(argv: list[str]) -> None:
    raise RuntimeError("a bug")


def test_a_refusal_is_one_line_and_exit_2_with_the_traceback_in_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        run_stage(_refuse, [])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("test_errors.py: error: data/x.tsv: column 'subject' is empty")
    assert "Traceback" not in err[0]
    log = (tmp_path / errors.ERROR_LOG).read_text()
    assert "Traceback (most recent call last)" in log
    assert "_refuse" in log


def test_debug_shows_the_traceback_on_screen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run_stage(_refuse, ["--debug"])
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1].startswith("test_errors.py: error: data/x.tsv")


def test_an_unexpected_error_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="a bug"):
        run_stage(_crash, [])
    assert not (tmp_path / errors.ERROR_LOG).exists()


def test_error_kinds_are_still_the_builtin_kinds() -> None:
    assert issubclass(MissingInputError, FileNotFoundError)
    assert issubclass(MissingKeyError, KeyError)
    # KeyError quotes its argument; a refusal reads as the sentence it is.
    assert (
        str(MissingKeyError("params.yaml: missing key 'qc'.")) == "params.yaml: missing key 'qc'."
    )


def _bad_params(tmp_path: Path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["qc"]["min_cells"] = 3
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_stage_script_refusing_bad_params_exits_2_with_one_line(tmp_path: Path) -> None:
    params = _bad_params(tmp_path)
    script = ROOT / "src/stages/qc.py"
    result = _run(
        [sys.executable, str(script), "--split", "train", "--params", str(params)], tmp_path
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"qc.py: error: {params}: unknown key 'qc.min_cells'; did you mean qc.min_genes? "
        "(params.schema.json lists every key) [traceback: logs/errors.log; --debug shows it here]"
    ]
    assert "Traceback" in (tmp_path / "logs/errors.log").read_text()


def test_the_cli_refusing_bad_params_exits_2_with_one_line(tmp_path: Path) -> None:
    params = _bad_params(tmp_path)
    cli = Path(sys.executable).with_name("rosmap-geneformer")
    result = _run([str(cli), "summary", "--params", str(params)], tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        f"rosmap-geneformer summary: error: {params}: unknown key 'qc.min_cells'"
    )
