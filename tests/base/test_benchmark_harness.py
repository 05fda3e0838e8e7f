"""The benchmarks' shared harness (``benchmarks/harness.py``): real process trees, load, JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def harness() -> ModuleType:
    # benchmarks/ is not a package: the scripts import the harness as a top-level module.
    spec = importlib.util.spec_from_file_location("harness", BENCHMARKS / "harness.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_rss_counts_the_whole_process_tree(harness: ModuleType) -> None:
    # The parent stays small; its child touches 200 MB (bytes * n writes every page).
    child = "import time; block = b'x' * (200 * 2**20); time.sleep(1.0)"
    parent = (
        f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    )
    result = harness.run_measured(
        [sys.executable, "-c", parent], echo=False, wait_quiet_s=0, load_sample_s=0.2
    )
    assert result["returncode"] == 0
    assert result["peak_rss_tree_mb"] > 200
    assert result["peak_rss_main_mb"] < 200
    assert result["max_processes"] >= 2
    assert result["wall_s"] >= 1.0
    assert result["cpu_s"] > 0
    # The load it started under and the sort dispatch sit beside every measurement.
    assert len(result["loadavg_before"]) == 3
    assert result["busy_cpus_before"] >= 0
    assert isinstance(result["quiet"], bool)
    assert result["sort_dispatch"]


def test_run_worker_returns_the_worker_result_and_its_measurement(
    harness: ModuleType, tmp_path: Path
) -> None:
    script = tmp_path / "bench.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import argparse, sys
            sys.path.insert(0, {str(BENCHMARKS)!r})
            import harness

            parser = argparse.ArgumentParser()
            harness.worker_arguments(parser)
            harness.serve_worker(parser.parse_args(), lambda config: {{"twice": 2 * config["x"]}})
            """
        )
    )
    result = harness.run_worker(script, {"x": 21}, wait_quiet_s=0, load_sample_s=0.2)
    assert result["twice"] == 42
    assert result["process"]["returncode"] == 0
    assert result["process"]["peak_rss_tree_mb"] > 0
    runs = [result, {**result, "twice": 50}]
    best = harness.best_of(runs, "twice")
    assert best["twice"] == 50
    assert best["twice_all_runs"] == [42, 50]
    assert len(best["loadavg_before_all_runs"]) == 2
    with pytest.raises(RuntimeError, match="failed"):
        harness.run_worker(script, {}, wait_quiet_s=0, load_sample_s=0.2)  # KeyError in it


def test_quoted_figures_are_labelled_and_json_is_plain(harness: ModuleType, tmp_path: Path) -> None:
    figure = harness.quoted({"cells_per_s": 1170}, source="spec 2.8")
    assert figure["kind"] == "quoted"
    assert figure["measured_in_this_run"] is False
    assert harness.ratio(3.0, 2.0) == 1.5
    assert harness.ratio(1.0, 0) is None
    path = tmp_path / "out" / "report.json"
    harness.write_json(
        {"a": np.float32(0.5), "b": float("nan"), "c": np.arange(2), "d": tmp_path}, path
    )
    assert json.loads(path.read_text()) == {"a": 0.5, "b": None, "c": [0, 1], "d": str(tmp_path)}


def test_machine_context_records_simd_and_sort_dispatch(harness: ModuleType) -> None:
    context = harness.machine_context()
    assert context["cpus"] >= 1
    assert {"baseline", "found", "not_found"} <= set(context["numpy_simd"])
    dispatch = context["sort_dispatch"]
    assert dispatch["target"]
    assert dispatch["argsort_float64_2048_us"] > 0
    assert len(context["loadavg_at_start"]) == 3


def test_the_wall_time_model_counts_the_encoders_flops() -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertModel

    from builders import tiny_geneformer_config

    spec = importlib.util.spec_from_file_location("wall_time", BENCHMARKS / "wall_time.py")
    assert spec is not None and spec.loader is not None
    wall_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wall_time)
    config = tiny_geneformer_config(50, num_hidden_layers=3)
    config._attn_implementation = "eager"  # attention as matmuls, which the counter sees
    model = BertModel(config, add_pooling_layer=False).eval()
    length = 40
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.arange(4, 4 + length)[None])
    expected = wall_time.forward_flops(layers=3, hidden=32, intermediate=64, length=length)
    assert counter.get_total_flops() == expected
    # Hours fall with the GPUs and rise with the cells; V2-104M costs 34x V1-10M per deletion.
    one = wall_time.hours("V1-10M", 1000, rate_per_device=4.0)
    assert wall_time.hours("V1-10M", 1000, rate_per_device=4.0, devices=8) == one / 8
    assert one == 1000 * 2048 / 4.0 / 3600
    ratio = wall_time.flops_per_pass("V2-104M") / wall_time.flops_per_pass("V1-10M")
    assert round(ratio) == 34
