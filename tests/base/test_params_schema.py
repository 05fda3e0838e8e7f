"""Tests for the typed params schema: closest keys, YAML's number traps, booleans, the JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from rosmap_geneformer.errors import InputError
from rosmap_geneformer.losses import LossLimit, check_loss
from rosmap_geneformer.params import read_params
from rosmap_geneformer.params_schema import SCHEMA_FILE, json_schema

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def _refusal(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as refused:
        read_params(path)
    message = str(refused.value)
    assert message.startswith(f"{path}:")
    return message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("qc:\n  min_cells: 3\n", "unknown key 'qc.min_cells'; did you mean qc.min_genes?"),
        ("grn:\n  regulator: [SOX9]\n", "did you mean grn.regulators?"),
        (
            "tasks:\n  disease:\n    label: ad_status\n    cell_type: [Mic]\n",
            "unknown key 'tasks.disease.cell_type'; did you mean tasks.disease.cell_types?",
        ),
        ("seeds: 1\n", "unknown key 'seeds'; did you mean seed?"),
    ],
)
def test_an_unknown_key_is_refused_with_the_closest_valid_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert expected in _refusal(tmp_path, text)


def test_yaml_1_1_exponents_are_read_as_the_numbers_they_spell(tmp_path: Path) -> None:
    # PyYAML reads 1e-4 (no dot) as the string '1e-4'.
    assert yaml.safe_load("x: 1e-4")["x"] == "1e-4"
    params = read_params(
        _write(tmp_path, "train:\n  learning_rate: 1e-4\nperturb:\n  max_cells: 1e3\n")
    )
    assert params.train.learning_rate == pytest.approx(1e-4)
    assert isinstance(params.train.learning_rate, float)
    assert params.perturb.max_cells == 1000
    assert isinstance(params.perturb.max_cells, int)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "train:\n  epochs: true\n",
            "train.epochs = True: expected a number, got the boolean true",
        ),
        (
            "qc:\n  scrublet:\n    n_prin_comps: yes\n",
            "qc.scrublet.n_prin_comps = True: expected an integer, got the boolean true",
        ),
        ("train:\n  learning_rate: 5%\n", "write a fraction (0.05) rather than a percentage"),
        ("qc:\n  max_pct_mito: ten\n", "qc.max_pct_mito = 'ten': expected a number"),
        ("perturb:\n  max_cells: 1.5\n", "perturb.max_cells = 1.5"),
        ("grn:\n  k: [10, true]\n", "grn.k"),
        ("perturb:\n  precision: fast\n", "'auto', 'float32', 'bfloat16' or 'float16'"),
        ("losses:\n  empty_cells: {warn: 0.5, stop: 0.1}\n", "must not exceed stop"),
    ],
)
def test_wrong_values_name_the_key_and_what_is_expected(
    tmp_path: Path, text: str, expected: str
) -> None:
    message = _refusal(tmp_path, text)
    assert expected in message
    assert "\n" not in message


def test_booleans_written_as_text_mean_what_they_say(tmp_path: Path) -> None:
    params = read_params(_write(tmp_path, 'qc:\n  scrublet:\n    enabled: "false"\n'))
    assert params.qc.scrublet.enabled is False


def test_several_problems_give_one_line_each(tmp_path: Path) -> None:
    message = _refusal(tmp_path, "train:\n  epochs: true\n  learning_rat: 0.1\n")
    assert len(message.splitlines()) == 2


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    message = _refusal(tmp_path, "train:\n  epochs: 3\n learning_rate: 0.1\n")
    assert "line 3" in message
    assert "not valid YAML" in message


def test_the_shipped_json_schema_is_current_and_checks_params_yaml() -> None:
    shipped = json.loads((ROOT / SCHEMA_FILE).read_text())
    assert shipped == json.loads(json.dumps(json_schema())), (
        "params.schema.json is stale: run `make schema`"
    )
    assert (
        (ROOT / "params.yaml")
        .read_text()
        .startswith(f"# yaml-language-server: $schema={SCHEMA_FILE}\n")
    )
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    jsonschema.validate(params, shipped)
    params["qc"]["min_cells"] = 3
    with pytest.raises(jsonschema.ValidationError, match="min_cells"):
        jsonschema.validate(params, shipped)
    params["qc"].pop("min_cells")
    params["train"]["dropout"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(params, shipped)


def test_a_loss_below_warn_is_counted_above_warn_logged_above_stop_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limit = LossLimit(warn=0.1, stop=0.5)
    entry = check_loss(5, 100, what="cells", key="empty_cells", limit=limit, source="s")
    assert entry == {
        "lost": 5,
        "total": 100,
        "fraction": 0.05,
        "warn_above": 0.1,
        "stop_above": 0.5,
        "status": "ok",
    }
    with caplog.at_level("WARNING"):
        entry = check_loss(20, 100, what="cells", key="empty_cells", limit=limit, source="s")
    assert entry["status"] == "warning"
    assert "losses.empty_cells.warn = 0.1" in caplog.text
    with pytest.raises(InputError, match=r"s: 60 of 100 cells \(60.0%\) were dropped, more than "):
        check_loss(60, 100, what="cells", key="empty_cells", limit=limit, source="s", hint="x")
    assert check_loss(0, 0, what="cells", key="k", limit=limit, source="s")["fraction"] == 0.0
