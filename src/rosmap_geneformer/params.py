"""Reading ``params.yaml`` into its typed schema and resolving the paths it declares.

Stage scripts read their parameters here and nowhere else, through :func:`stage_arguments`, which
returns a validated :class:`~rosmap_geneformer.params_schema.Params`; the keys a stage reads are
the keys ``dvc.yaml`` lists for it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rosmap_geneformer.params_schema import Params

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


def read_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Load and validate the pipeline parameters.

    Parameters
    ----------
    path
        The YAML file; ``params.yaml`` in the working directory by default.

    Returns
    -------
    The typed parameters: every section present in the file, validated.

    Raises
    ------
    ValueError
        One line per problem, each naming the file, the dotted key and what is expected.
    """
    raw = load_params(path)
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        problems = [_describe(path, problem) for problem in error.errors()]
        raise ValueError("\n".join(problems)) from None


def _describe(path: str | Path, problem: Mapping[str, Any]) -> str:
    """One line for one validation problem: file, dotted key, what is wrong."""
    key = ".".join(str(part) for part in problem["loc"])
    if problem["type"] == "extra_forbidden":
        return f"{path}: unknown key {key!r}; remove it or fix its spelling (see the shipped params.yaml)."
    if problem["type"] == "missing":
        return f"{path}: missing key {key!r}; add it (see the shipped params.yaml)."
    return f"{path}: {key} = {problem.get('input')!r}: {problem['msg']}."


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


def raw_paths(params: Params) -> dict[str, Path]:
    """Paths of the four raw input files for the configured ``data.source``.

    ``dvc.yaml`` builds the same paths as ``${paths.raw}/${data.source}/${raw.<file>}``.
    """
    root = Path(params.paths.raw) / params.data.source
    return {name: root / file for name, file in params.raw.model_dump().items()}


def stage_arguments(
    argv: list[str] | None,
    *,
    description: str | None,
    with_split: bool = False,
    with_task: bool = False,
) -> tuple[argparse.Namespace, Params]:
    """Parse a stage script's command line and load its typed parameters.

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
    params = read_params(args.params)
    if with_task:
        tasks = params.section("tasks")
        if args.task not in tasks:
            msg = f"{args.params}: no task {args.task!r} under tasks; known: {sorted(tasks)}."
            raise ValueError(msg)
    return args, params
