"""Reading ``params.yaml`` and resolving the paths it declares.

Stage scripts read their parameters here and nowhere else, so that the keys a stage reads are the
keys ``dvc.yaml`` lists for it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("params.yaml")
SPLITS = ("train", "val", "test")


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Load the pipeline parameters.

    Parameters
    ----------
    path
        The YAML file; ``params.yaml`` in the working directory by default.

    Returns
    -------
    The parsed mapping.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: parameter file not found. Run stages from the project root (where dvc.yaml is)."
        raise FileNotFoundError(msg)
    with path.open() as fh:
        params = yaml.safe_load(fh)
    if not isinstance(params, dict):
        msg = f"{path}: expected a mapping at the top level, got {type(params).__name__}."
        raise ValueError(msg)
    return params


def get(params: Mapping[str, Any], dotted: str) -> Any:
    """Return ``params[a][b][c]`` for ``dotted="a.b.c"`` with an error that names the missing key."""
    node: Any = params
    walked: list[str] = []
    for key in dotted.split("."):
        walked.append(key)
        if not isinstance(node, Mapping) or key not in node:
            msg = f"params.yaml: missing key {'.'.join(walked)!r} (needed: {dotted!r})."
            raise KeyError(msg)
        node = node[key]
    return node


def check_known_keys(values: Mapping[str, Any], known: Iterable[str], *, section: str) -> None:
    """Refuse keys of ``params.yaml: <section>`` that the code does not read (typos).

    Raises
    ------
    ValueError
        Naming the section, the unknown keys and the known ones.
    """
    known = set(known)
    unknown = sorted(set(values) - known)
    if unknown:
        msg = f"params.yaml {section}: unknown keys {unknown}; known: {sorted(known)}."
        raise ValueError(msg)


def raw_paths(params: Mapping[str, Any]) -> dict[str, Path]:
    """Paths of the four raw input files for the configured ``data.source``.

    ``dvc.yaml`` builds the same paths as ``${paths.raw}/${data.source}/${raw.<file>}``.
    """
    root = Path(get(params, "paths.raw")) / get(params, "data.source")
    files = get(params, "raw")
    return {
        name: root / files[name]
        for name in ("counts", "individual_metadata", "batch_mapping", "cell_annotation")
    }


def stage_arguments(
    argv: list[str] | None,
    *,
    description: str | None,
    with_split: bool = False,
    with_task: bool = False,
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parse a stage script's command line and load its parameters.

    Every stage takes ``--params`` (default ``params.yaml``); foreach stages also take
    ``--split`` or ``--task`` (a key of ``params.yaml: tasks``, checked here).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="parameter file")
    if with_split:
        parser.add_argument("--split", required=True, choices=SPLITS)
    if with_task:
        parser.add_argument("--task", required=True, help="a key of params.yaml: tasks")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if with_task:
        tasks = get(params, "tasks")
        if args.task not in tasks:
            msg = f"{args.params}: no task {args.task!r} under tasks; known: {sorted(tasks)}."
            raise ValueError(msg)
    return args, params
