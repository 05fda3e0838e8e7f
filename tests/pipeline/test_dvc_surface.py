"""What a user sees of the pipeline through DVC: exact code dependencies, one-line param sets,
a small set of headline metrics and a params.yaml that the typed schema accepts.

These read the repository's own dvc.yaml and params.yaml; they run no stage.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
from pathlib import Path

import grimp
import pytest
import yaml
from dvc.utils.serialize._yaml import dumps_yaml, parse_yaml_for_update

from rosmap_geneformer.params import read_params

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = "rosmap_geneformer"
# Plumbing that cannot change a stage's outputs: logging set-up, how refusals are shown and
# reading params.yaml (DVC tracks the values themselves). Listing them would rerun the whole
# pipeline for a new key or a reworded message.
PLUMBING = {
    f"{LIBRARY}.logs",
    f"{LIBRARY}.errors",
    f"{LIBRARY}.params",
    f"{LIBRARY}.params_schema",
}


def _stages() -> dict[str, dict]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def _module_file(module: str) -> str:
    path = Path("src", *module.split("."))
    return f"{path}.py" if (ROOT / f"{path}.py").is_file() else f"{path / '__init__.py'}"


def _imported_library_modules(script: Path, graph: grimp.ImportGraph) -> set[str]:
    """Library modules a stage script imports, at any depth (lazy imports included)."""
    direct: set[str] = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(LIBRARY):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                direct.add(candidate if candidate in graph.modules else node.module)
        elif isinstance(node, ast.Import):
            direct.update(a.name for a in node.names if a.name.startswith(LIBRARY))
    closure = set(direct)
    for module in direct:
        closure |= graph.find_upstream_modules(module)
    # A package's __init__ runs on import but holds only its docstring here: not a dependency.
    return {
        m
        for m in closure - PLUMBING
        if not (ROOT / "src" / Path(*m.split(".")) / "__init__.py").is_file()
    }


def test_each_stage_depends_on_exactly_the_code_it_runs() -> None:
    graph = grimp.build_graph(LIBRARY)
    problems = []
    for name, stage in sorted(_stages().items()):
        script = re.search(r"(src/stages/\S+\.py)", stage["cmd"]).group(1)
        expected = {script} | {
            _module_file(m) for m in _imported_library_modules(ROOT / script, graph)
        }
        listed = {d for d in stage.get("deps", []) if isinstance(d, str) and d.startswith("src/")}
        if listed != expected:
            problems.append(
                f"{name}: add {sorted(expected - listed)}, remove {sorted(listed - expected)}"
            )
    assert not problems, "dvc.yaml code deps differ from the imports:\n" + "\n".join(problems)


def test_a_param_set_changes_one_line_of_params_yaml() -> None:
    """``dvc exp run -S`` rewrites params.yaml with DVC's own YAML writer: one value, one line."""
    text = (ROOT / "params.yaml").read_text()
    assert dumps_yaml(parse_yaml_for_update(text, "params.yaml")) == text
    data = parse_yaml_for_update(text, "params.yaml")
    data["train"]["learning_rate"] = 3e-4
    data["qc"]["scrublet"]["threshold"] = 0.3
    changed = [
        line
        for line in difflib.unified_diff(
            text.splitlines(), dumps_yaml(data).splitlines(), lineterm="", n=0
        )
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert len(changed) == 4, changed
    assert any("learning_rate: 0.0003" in line and "# Geneformer" in line for line in changed)


def test_dvc_metrics_are_the_headline_results() -> None:
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    paths = yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]
    declared = [m if isinstance(m, str) else next(iter(m)) for m in dvc_yaml["metrics"]]
    for stage in dvc_yaml["stages"].values():
        for entry in stage.get("do", stage).get("metrics", []):
            declared.append(entry if isinstance(entry, str) else next(iter(entry)))
    assert all(
        "/eval/" in m
        or "/baseline/" in m
        or "dvclive" in m
        or "/grn/" in m
        or "/embed/" in m
        or "/tune/" in m
        or "/donor/" in m
        for m in declared
    ), declared

    def leaves(value: object) -> int:
        return sum(leaves(v) for v in value.values()) if isinstance(value, dict) else 1

    total = 0
    for entry in declared:
        path = entry.replace("${paths.reports}", paths["reports"]).replace(
            "${paths.dvclive}", paths["dvclive"]
        )
        for task in ("cell_type", "disease"):
            file = ROOT / path.replace("${key}", task)
            if file.is_file():
                total += leaves(json.loads(file.read_text()))
            if "${key}" not in path:
                break
    # 151 before the donor stage, which adds its 4 headline figures per method (28); grn shows
    # AUPRC and EPR per method and EPR on TF regulators, each with its interval (75 for its 8
    # methods, 231 in all; issue #18 asks for the intervals among the DVC metrics).
    assert 0 < total <= 240, total


def test_shipped_params_yaml_fits_the_schema() -> None:
    params = read_params(ROOT / "params.yaml")
    assert params.qc.scrublet.max_cells_per_run == 5000
    assert params.tasks["disease"].positive_class == "AD"
    # The typed layer hands on exactly what the file says (no int turned into a float).
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params.model_dump(exclude_unset=True) == raw


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"qc": {"min_gene": 3}}, r"unknown key 'qc\.min_gene'"),
        ({"qc": {"scrublet": {"n_prin_comps": "many"}}}, r"qc\.scrublet\.n_prin_comps = 'many'"),
        ({"tasks": {"disease": {"cell_types": None}}}, r"missing key 'tasks\.disease\.label'"),
    ],
)
def test_bad_params_get_one_line_naming_file_and_key(tmp_path: Path, edit, message) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(edit))
    with pytest.raises(ValueError, match=message) as caught:
        read_params(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_fine_tuning_param_reruns_only_what_reads_the_fine_tuned_models() -> None:
    """``dvc exp run -S train.learning_rate=...``: train and the stages that read its models."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        graph = repo.index.graph
        stages = {stage.addressing: stage for stage in graph.nodes}
        trains = [stages["train@cell_type"], stages["train@disease"]]
        downstream = {s.addressing for t in trains for s in nx.ancestors(graph, t)}
    # grn reads the base model (grn.model), the report reads every report, donor scores donors
    # with the fine-tuned disease model.
    assert downstream == {
        "evaluate@cell_type",
        "evaluate@disease",
        "donor@disease",
        "embed",
        "perturb",
        "report",
    }
