"""How the data stages scale with the number of cells: ``python benchmarks/scale.py``.

For each cell count (``--cells``, default 50,000, 200,000 and 500,000), generates a ROSMAP-shaped
input (:mod:`rosmap_geneformer.data.synthetic_scale`: 33,538 genes, about 2,000 detected per cell,
about 2,000 cells per library, 3 libraries per donor) into ``<workdir>/<cells>/data/raw/scale/``,
writes a ``params.yaml`` there (the repository's, with ``data.source: scale``,
``tokenize.model_input_size: 2048`` and ``compute.workers`` from ``--workers``) and runs every data
stage in DAG order as its own process (``python <repo>/src/stages/<stage>.py --params params.yaml
[--split s]``, from that folder): gene_map, convert_genes, split, qc x 3, annotate x 3, sample,
dictionaries, tokenize x 3. Each run is measured by :mod:`harness` (after waiting for a quiet
machine): wall and CPU seconds, the peak summed RSS of the process tree, and the bytes of the
outputs ``dvc.yaml`` declares for the stage (outs, metrics, plots). Generation is measured the
same way, apart: it is not a pipeline stage.

Writes ``reports/benchmarks/scale.json`` (machine, settings, per size and stage figures, linear
fits of time and memory against cells, extrapolated to ROSMAP's 2,660,000 cells) and
``reports/benchmarks/scale.png``, and prints markdown tables. The JSON is rewritten after each
size, so a long run keeps what it measured. Each size's folder is deleted after it is measured
unless ``--keep`` (stage logs stay in ``<workdir>/logs/``). Disk: about 17 bytes per non-zero
while a size runs (the raw and the converted matrix, 8 bytes each), about 17 GB at 500,000 cells.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import harness
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
# (stage name in dvc.yaml, script, --split)
STAGES: tuple[tuple[str, str, str | None], ...] = (
    ("gene_map", "gene_map.py", None),
    ("convert_genes", "convert_genes.py", None),
    ("split", "split.py", None),
    *((f"qc@{s}", "qc.py", s) for s in SPLITS),
    *((f"annotate@{s}", "annotate.py", s) for s in SPLITS),
    ("sample", "sample.py", None),
    ("dictionaries", "dictionaries.py", None),
    *((f"tokenize@{s}", "tokenize_split.py", s) for s in SPLITS),
)
ROSMAP_CELLS = 2_660_000
SOURCE = "scale"
MB = 2**20

logger = logging.getLogger("benchmarks.scale")


def portable(obj: Any, *, workdir: Path) -> Any:
    """``obj`` with this checkout's and the work folder's paths written as ``.`` and ``<workdir>``."""
    text = json.dumps(obj)
    for path, name in (
        (Path(sys.executable).parent, "<python>"),
        (workdir, "<workdir>"),
        (ROOT, "."),
    ):
        text = text.replace(str(path.resolve()), name).replace(str(path), name)
    return json.loads(text)


def work_params(*, workers: str) -> dict[str, Any]:
    """The repository's params.yaml with the benchmark's few changes."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = SOURCE
    params["tokenize"]["model_input_size"] = 2048
    params["compute"]["workers"] = int(workers) if workers.isdigit() else workers
    return params


def _resolve(text: str, params: dict[str, Any], item: str | None) -> str:
    def value(match: re.Match[str]) -> str:
        key = match.group(1)
        if key == "item":
            return str(item)
        node: Any = params
        for part in key.split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def declared_outputs(stage: str, params: dict[str, Any]) -> list[str]:
    """Paths ``dvc.yaml`` declares as outs, metrics and plots of ``stage`` (``name@item``)."""
    name, _, item = stage.partition("@")
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]
    spec = spec.get("do", spec)
    paths = []
    for section in ("outs", "metrics", "plots"):
        for entry in spec.get(section, []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            paths.append(_resolve(path, params, item or None))
    return paths


def disk_bytes(path: Path) -> int:
    """Apparent size of a file, or of every file under a folder; 0 when absent."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def _generate(args: argparse.Namespace) -> None:
    """In a child process (so the measuring parent stays small): write the input."""
    from rosmap_geneformer.data.synthetic_scale import generate_rosmap_shaped
    from rosmap_geneformer.logs import setup_logging

    setup_logging()
    summary = generate_rosmap_shaped(args.out, n_cells=args.generate, seed=args.seed)
    harness.write_json(summary, args.summary)


def measure_size(n_cells: int, args: argparse.Namespace) -> dict[str, Any]:
    """Generate ``n_cells``, then run and measure every stage; the size's figures."""
    size_dir = args.workdir / str(n_cells)
    logs = args.workdir / "logs" / str(n_cells)
    if size_dir.exists():
        shutil.rmtree(size_dir)
    logs.mkdir(parents=True, exist_ok=True)
    params = work_params(workers=args.workers)
    raw = size_dir / params["paths"]["raw"] / SOURCE
    raw.mkdir(parents=True)
    (size_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "ROSMAP_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
    run = {"cwd": size_dir, "env": env, "wait_quiet_s": args.wait_quiet, "echo": not args.quiet}

    logger.info("%d cells: generating the input in %s", n_cells, raw)
    summary_path = logs / "generation.json"
    cmd = [sys.executable, __file__, "--generate", str(n_cells), "--seed", str(args.seed)]
    cmd += ["--out", str(raw), "--summary", str(summary_path)]
    generation = harness.run_measured(cmd, log=logs / "generation.log", **run)
    if generation["returncode"]:
        return {"cells": n_cells, "failed": "generation", "generation": generation}
    generation.pop("output_tail")
    generation["summary"] = json.loads(summary_path.read_text())
    generation["cells_per_s"] = round(n_cells / generation["wall_s"], 1)
    input_bytes = disk_bytes(raw)
    logger.info(
        "%d cells: generated in %.1f s (%.0f cells/s), %.1f MB on disk, peak %.0f MB",
        *(n_cells, generation["wall_s"], generation["cells_per_s"], input_bytes / MB),
        generation["peak_rss_tree_mb"],
    )
    result: dict[str, Any] = {
        "cells": n_cells,
        "generation": generation,
        "input_bytes": input_bytes,
        "stages": [],
    }
    for index, (stage, script, split) in enumerate(STAGES, start=1):
        cmd = [sys.executable, ROOT / "src" / "stages" / script, "--params", "params.yaml"]
        cmd += ["--split", split] if split else []
        logger.info("%d cells: stage %s (%d/%d)", n_cells, stage, index, len(STAGES))
        figures = harness.run_measured(cmd, log=logs / f"{stage}.log", **run)
        figures["stage"] = stage
        if figures["returncode"]:
            logger.error(
                "%d cells: stage %s failed (exit %d) in %s:\n  %s\n%s",
                *(n_cells, stage, figures["returncode"], size_dir, " ".join(figures["cmd"])),
                figures["output_tail"],
            )
            result["stages"].append(figures)
            result["failed"] = stage
            return result
        figures.pop("output_tail")
        outputs = {p: disk_bytes(size_dir / p) for p in declared_outputs(stage, params)}
        figures["outputs"] = outputs
        figures["output_bytes"] = sum(outputs.values())
        result["stages"].append(figures)
        logger.info(
            "%d cells: %s took %.1f s wall, %.1f s CPU, peak %.0f MB, wrote %.1f MB",
            *(n_cells, stage, figures["wall_s"], figures["cpu_s"], figures["peak_rss_tree_mb"]),
            figures["output_bytes"] / MB,
        )
    stages = result["stages"]
    result["total"] = {
        "wall_s": round(sum(s["wall_s"] for s in stages), 3),
        "cpu_s": round(sum(s["cpu_s"] for s in stages), 3),
        "peak_rss_tree_mb": max(s["peak_rss_tree_mb"] for s in stages),
        "output_bytes": sum(s["output_bytes"] for s in stages),
    }
    result["intermediates_over_input"] = round(result["total"]["output_bytes"] / input_bytes, 3)
    if not args.keep:
        shutil.rmtree(size_dir)
    return result


def fit(cells: list[int], values: list[float]) -> dict[str, float] | None:
    """Least-squares line; slope per 100k cells, intercept, value at ROSMAP's size."""
    if len(set(cells)) < 2:
        return None
    slope, intercept = np.polyfit(np.asarray(cells, float), np.asarray(values, float), 1)
    return {
        "per_100k_cells": round(float(slope) * 1e5, 3),
        "intercept": round(float(intercept), 3),
        f"at_{ROSMAP_CELLS}": round(float(slope * ROSMAP_CELLS + intercept), 1),
    }


def fits(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage (and for all stages, and generation): wall time and peak memory vs cells."""
    done = [s for s in sizes if "failed" not in s]
    rows: dict[str, list[tuple[int, float, float]]] = {}
    for size in done:
        for stage in size["stages"]:
            row = (size["cells"], stage["wall_s"], stage["peak_rss_tree_mb"])
            rows.setdefault(stage["stage"], []).append(row)
        gen, total = size["generation"], size["total"]
        rows.setdefault("(all stages)", []).append(
            (size["cells"], total["wall_s"], total["peak_rss_tree_mb"])
        )
        rows.setdefault("(generation)", []).append(
            (size["cells"], gen["wall_s"], gen["peak_rss_tree_mb"])
        )
    out = {}
    for stage, points in rows.items():
        n, wall, rss = (list(v) for v in zip(*points, strict=True))
        out[stage] = {"wall_s": fit(n, wall), "peak_rss_tree_mb": fit(n, rss)}
    return out


def plot(sizes: list[dict[str, Any]], path: Path) -> None:
    """Two panels: peak memory and wall time against cells, one line per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [s for s in sizes if "failed" not in s]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    colours = plt.get_cmap("tab10")
    families = list(dict.fromkeys(stage.partition("@")[0] for stage, _, _ in STAGES))
    dashes = {None: "-", "train": "-", "val": "--", "test": ":"}
    for stage, _, split in STAGES:
        n = [s["cells"] for s in done]
        figures = [next(x for x in s["stages"] if x["stage"] == stage) for s in done]
        colour = colours(families.index(stage.partition("@")[0]) % 10)
        style = {"marker": "o", "color": colour, "linestyle": dashes[split], "label": stage}
        axes[0].plot(n, [f["peak_rss_tree_mb"] / 1024 for f in figures], **style)
        axes[1].plot(n, [f["wall_s"] / 60 for f in figures], **style)
    for ax, label in zip(
        axes, ("peak RSS of the process tree (GiB)", "wall time (min)"), strict=True
    ):
        ax.set_xlabel("cells")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("Peak memory per stage")
    axes[1].set_title("Wall time per stage")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    """Tables: figures per size and stage; fits and the extrapolation to ROSMAP."""
    lines = ["| cells | stage | wall s | CPU s | peak RSS MB | outputs MB |", "|---" * 6 + "|"]
    for size in report["sizes"]:
        gen = size.get("generation", {})
        if "wall_s" in gen:
            lines.append(
                f"| {size['cells']:,} | (generation) | {gen['wall_s']:.1f} | {gen['cpu_s']:.1f} "
                f"| {gen['peak_rss_tree_mb']:.0f} | {size.get('input_bytes', 0) / MB:.0f} |"
            )
        for s in size["stages"]:
            failed = " (FAILED)" if s["returncode"] else ""
            lines.append(
                f"| {size['cells']:,} | {s['stage']}{failed} | {s['wall_s']:.1f} | {s['cpu_s']:.1f} "
                f"| {s['peak_rss_tree_mb']:.0f} | {s.get('output_bytes', 0) / MB:.0f} |"
            )
        if "total" in size:
            t = size["total"]
            lines.append(
                f"| {size['cells']:,} | (all stages) | {t['wall_s']:.1f} | {t['cpu_s']:.1f} "
                f"| {t['peak_rss_tree_mb']:.0f} (max) | {t['output_bytes'] / MB:.0f} "
                f"({size['intermediates_over_input']:.2f} x input) |"
            )
    at = f"at_{ROSMAP_CELLS}"
    lines += [
        "",
        f"| stage | s per 100k cells | s intercept | s at {ROSMAP_CELLS:,} | MB per 100k cells "
        f"| MB intercept | MB at {ROSMAP_CELLS:,} |",
        "|---" * 7 + "|",
    ]
    fitted = {k: f for k, f in report["fits"].items() if None not in f.values()}
    if not fitted:
        lines.append(f"| (fits need two sizes or more) |{' |' * 6}")
    for stage, f in fitted.items():
        t, m = f["wall_s"], f["peak_rss_tree_mb"]
        lines.append(
            f"| {stage} | {t['per_100k_cells']:.1f} | {t['intercept']:.1f} | {t[at]:.0f} "
            f"| {m['per_100k_cells']:.1f} | {m['intercept']:.0f} | {m[at]:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="50000,200000,500000", help="comma-separated")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rosmap-geneformer-scale"
    )
    parser.add_argument("--workers", default="1", help="compute.workers (an integer or auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated input")
    parser.add_argument("--keep", action="store_true", help="keep each size's folder")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=120.0,
        help="seconds to wait before each run for other load to drop below 0.3 CPU",
    )
    parser.add_argument("--quiet", action="store_true", help="do not echo the stages' logs")
    parser.add_argument("--output", type=Path, default=ROOT / "reports/benchmarks/scale.json")
    parser.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--summary", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate:
        _generate(args)
        return
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s", datefmt="%X")
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    params = work_params(workers=args.workers)
    report = harness.start_report(
        "scale",
        settings={
            "workdir": str(args.workdir),
            "seed": args.seed,
            "workers": params["compute"]["workers"],
            "changed_params": {
                "data.source": SOURCE,
                "tokenize.model_input_size": 2048,
                "compute.workers": params["compute"]["workers"],
            },
            "params_read": {
                "compute": params["compute"],
                "tokenize.nproc": params["tokenize"]["nproc"],
                "tokenize.chunk_size": params["tokenize"]["chunk_size"],
                "dictionaries.chunk_size": params["dictionaries"]["chunk_size"],
                "qc.scrublet": params["qc"]["scrublet"],
            },
            "memory": "peak of the summed RSS of the process tree, sampled every 0.05 s "
            "(pages shared by forked workers count once per process: an upper bound)",
            "outputs": "apparent bytes of the outs, metrics and plots dvc.yaml declares",
        },
        sizes=[],
        fits={},
    )
    failed = False
    for n_cells in (int(c) for c in args.cells.split(",")):
        size = measure_size(n_cells, args)
        report["sizes"].append(size)
        report["fits"] = fits(report["sizes"])
        harness.write_json(portable(report, workdir=Path(args.workdir)), args.output)
        if "failed" in size:
            failed = True
            logger.error("%d cells: stopped at %s; work folder kept", n_cells, size["failed"])
            break
    report["load_after"] = harness.load_after()
    harness.write_json(portable(report, workdir=Path(args.workdir)), args.output)
    plot(report["sizes"], args.output.with_suffix(".png"))
    print(markdown(report))
    logger.info("wrote %s and %s", args.output, args.output.with_suffix(".png"))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
