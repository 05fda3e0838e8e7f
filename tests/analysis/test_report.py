from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest

from rosmap_geneformer import io
from rosmap_geneformer.analysis.headline import headline
from rosmap_geneformer.analysis.report import SECTIONS, ReportBuilder

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _write_outputs(root: Path) -> list[str]:
    reports = root / "reports"
    io.write_json(
        {"cells": 100, "genes_total": 50, "genes_output": 48, "match_kind": {"gene_name": 48}},
        reports / "genes/mapping.json",
    )
    io.write_json(
        {
            "train": {
                "n_cells": 60,
                "n_patients": 4,
                "patients_per_ad_status": {"AD": 2, "control": 2},
            },
            "val": {"n_cells": 20, "n_patients": 2},
            "test": {"n_cells": 20, "n_patients": 2},
            "balance_pvalues": {"msex": 0.5},
        },
        reports / "split.json",
    )
    io.write_json(
        {"cells_in": 60, "cells_out": 55, "removed_by_filters": 4, "doublets_predicted": 1},
        reports / "qc/train.json",
    )
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    io.save_figure(fig, reports / "qc/train/qc_distributions.png")
    io.write_json(
        {
            "cell": {"accuracy": 0.9, "accuracy_ci_low": 0.8, "accuracy_ci_high": 0.95},
            "patient": {"auroc": 0.75},
        },
        reports / "eval/disease/metrics.json",
    )
    io.write_json(
        {"cell": {"accuracy": 0.85}, "patient": {"auroc": 0.5}},
        reports / "baseline/disease/metrics.json",
    )
    return [
        "reports/genes/mapping.json",
        "reports/split.json",
        "reports/qc/train.json",
        "reports/qc/train/qc_distributions.png",
        "reports/eval/disease/metrics.json",
        "reports/baseline/disease/metrics.json",
    ]


def test_report_has_every_section_reads_numbers_from_files_and_names_them(tmp_path: Path) -> None:
    expected = _write_outputs(tmp_path)
    builder = ReportBuilder(
        paths={"reports": "reports", "dvclive": "dvclive"}, tasks=["disease"], root=tmp_path
    )
    page = builder.build()
    for key, _ in SECTIONS:
        assert f'<section id="{key}">' in page
    assert set(expected) <= set(builder.files_read)
    for name in expected:
        assert f"<code>{name}</code>" in page
    assert "0.900 [0.800, 0.950]" in page, "fine-tuned accuracy with its interval"
    assert "0.500" in page, "baseline patient AUROC"
    assert page.count("data:image/png;base64,") == 1
    assert "Not available yet: run the <code>perturb</code> stage" in page


def test_tuning_perturbation_and_network_sections_show_their_numbers(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    io.write_json(
        {
            "task": "disease",
            "metric": "val_patient_auroc",
            "trials": {"total": 6, "pruned": 2},
            "best": {"value": 0.8125, "trial": 3},
            "baseline": {"value": 0.75, "trial": 0},
        },
        reports / "tune/metrics.json",
    )
    (reports / "tune/best_params.yaml").write_text("train:\n  learning_rate: 0.00042\n")
    io.write_json(
        {"runs": {"delete": {"perturbations": 1234, "top_genes": ["APOE"]}}},
        reports / "perturb/summary.json",
    )
    io.write_tsv(
        pd.DataFrame({"symbol": ["TREM2", "APOE"], "mean_shift": [0.031, 0.02]}),
        reports / "perturb/delete.tsv",
    )
    io.write_json(
        {
            "candidate_edges": 4321,
            "all": {
                "deletion": {"auprc": 0.613, "epr": 6.5},
                "random": {"auprc": 0.051, "epr": 0.9},
            },
        },
        reports / "grn/metrics.json",
    )
    io.write_json(
        {
            "evaluation": {
                "cases": {
                    "indirect": {
                        "edges": 4,
                        "true_edges": False,
                        "recovered": {"deletion": 0.25, "random": 0.0},
                    }
                }
            }
        },
        reports / "grn/summary.json",
    )
    io.write_tsv(
        pd.DataFrame(
            {
                "scope": ["all", "all"],
                "method": ["deletion", "random"],
                "epr": [6.5, 0.9],
                "epr_low": [2.25, 0.5],
                "epr_high": [9.0, 1.5],
            }
        ),
        reports / "grn/methods.tsv",
    )
    builder = ReportBuilder(
        paths={"reports": "reports", "dvclive": "dvclive"}, tasks=["disease"], root=tmp_path
    )
    page = builder.build()

    def section(key: str) -> str:
        return page.split(f'<section id="{key}">')[1].split("</section>")[0]

    assert "0.812" in section("tuning") and "learning_rate: 0.00042" in section("tuning")
    assert "1,234" in section("perturbation") and "TREM2" in section("perturbation")
    network = section("network")
    assert "4,321" in network and "6.5 [2.25, 9]" in network and "0.9 [0.5, 1.5]" in network
    assert "indirect" in network and "0.25" in network
    assert {"reports/tune/best_params.yaml", "reports/grn/metrics.json"} <= set(builder.files_read)

    _write_outputs(tmp_path)
    text = headline(reports, ["disease"])
    assert "disease    fine-tuned cell accuracy 0.900 [0.800, 0.950]; patient auroc 0.750" in text
    assert "disease    baseline   cell accuracy 0.850; patient auroc 0.500" in text
    assert "tune (disease, val_patient_auroc): best 0.812 (trial 3) vs defaults 0.750" in text
    assert "perturb delete: top genes APOE" in text
    assert "grn EPR (all edges; 1 = random): deletion 6.50, random 0.90" in text


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)"
)
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    _write_outputs(tmp_path)
    page = ReportBuilder(
        paths={"reports": "reports", "dvclive": "dvclive"}, tasks=["disease"], root=tmp_path
    ).build()
    index = tmp_path / "index.html"
    index.write_text(page)
    dom = subprocess.run(
        [
            "chromium",
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            index.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert 'data-broken-images="0"' in dom
    assert 'data-images="1"' in dom
    assert all(f'<section id="{key}">' in dom for key, _ in SECTIONS)
    assert dom.count("<h2>") == len(SECTIONS)
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            "chromium",
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile2'}",
            "--window-size=1280,2000",
            f"--screenshot={shot}",
            index.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000
