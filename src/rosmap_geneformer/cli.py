"""The ``rosmap-geneformer`` command line: one subcommand per task.

``rosmap-geneformer tokenize --input X.h5ad --output OUT.dataset --token-dictionary T.pkl
--gene-median-dictionary M.pkl [--model-input-size 2048] [--special-tokens] [--columns a,b]``

``rosmap-geneformer dictionaries --input train.h5ad --output DIR [--special-tokens]``

``rosmap-geneformer summary [--params params.yaml]``: the headline results of a pipeline run.

``rosmap-geneformer schema [--output params.schema.json]``: the JSON Schema of ``params.yaml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def _columns(text: str) -> list[str]:
    columns = [c.strip() for c in text.split(",") if c.strip()]
    return columns


def _add_tokenize(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tokenize",
        help="rank-value encode an h5ad into a Geneformer dataset (save_to_disk layout)",
        description=(
            "Tokenize raw counts the way Geneformer's TranscriptomeTokenizer does, token for "
            "token. Input contract: X raw integer counts (CSR or dense), var['ensembl_id'], "
            "obs['n_counts'] (total counts over all genes), optional obs['filter_pass']."
        ),
    )
    parser.add_argument("--input", required=True, type=Path, help="input .h5ad")
    parser.add_argument("--output", required=True, type=Path, help="output .dataset directory")
    parser.add_argument("--token-dictionary", required=True, type=Path, help="token dict .pkl")
    parser.add_argument(
        "--gene-median-dictionary", required=True, type=Path, help="gene median dict .pkl"
    )
    parser.add_argument(
        "--model-input-size",
        type=int,
        default=2048,
        help="maximum input_ids length, special tokens included (V1 2048, V2 4096)",
    )
    parser.add_argument(
        "--special-tokens",
        action="store_true",
        help="add <cls> ... <eos> (V2 models; needs a dictionary with them)",
    )
    parser.add_argument(
        "--columns",
        type=_columns,
        default=["cell_id"],
        help="comma-separated obs columns to copy (cell_id = obs_names); default cell_id",
    )
    parser.add_argument("--chunk-size", type=int, default=512, help="cells per chunk")
    parser.add_argument("--nproc", type=int, default=1, help="encoding processes")
    parser.add_argument("--report", type=Path, help="also write the report JSON here")
    parser.set_defaults(func=_run_tokenize)


def _run_tokenize(args: argparse.Namespace) -> int:
    from rosmap_geneformer.geneformer.dictionaries import load_dictionaries
    from rosmap_geneformer.geneformer.tokenizer import tokenize_h5ad
    from rosmap_geneformer.io import write_json

    dictionaries = load_dictionaries(args.token_dictionary, args.gene_median_dictionary)
    report = tokenize_h5ad(
        args.input,
        args.output,
        dictionaries=dictionaries,
        model_input_size=args.model_input_size,
        special_tokens=args.special_tokens,
        columns=args.columns,
        chunk_size=args.chunk_size,
        nproc=args.nproc,
    )
    if args.report:
        write_json(report, args.report)
    cells = report["cells"]
    print(
        f"{args.output}: {cells['tokenized']} cells tokenized "
        f"({cells['filtered_out']} filtered out, {cells['dropped_empty']} empty dropped)"
    )
    return 0


def _add_dictionaries(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dictionaries",
        help="build token and gene median dictionaries from (training) data",
        description=(
            "Exact non-zero median of counts / n_counts * 10,000 per gene (streamed), written as "
            "token_dictionary.pkl and gene_median_dictionary.pkl."
        ),
    )
    parser.add_argument("--input", required=True, type=Path, help="input .h5ad (train split)")
    parser.add_argument("--output", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--special-tokens", action="store_true", help="V2 layout: add <cls> 2 and <eos> 3"
    )
    parser.add_argument("--chunk-size", type=int, default=4096, help="cells per chunk")
    parser.set_defaults(func=_run_dictionaries)


def _run_dictionaries(args: argparse.Namespace) -> int:
    from rosmap_geneformer.geneformer.dictionaries import (
        build_dictionaries,
        compute_nonzero_medians,
        save_dictionaries,
    )

    medians, report = compute_nonzero_medians(args.input, chunk_size=args.chunk_size)
    dictionaries = build_dictionaries(
        medians, special_tokens=args.special_tokens, source=str(args.input)
    )
    paths = save_dictionaries(dictionaries, args.output)
    print(
        json.dumps(
            {**report, "layout": dictionaries.layout, **{k: str(v) for k, v in paths.items()}},
            indent=2,
        )
    )
    return 0


def _add_summary(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "summary",
        help="print the headline results of the pipeline (what `make demo` shows)",
        description="Test metrics per task (fine-tuned and baseline), tuning, perturbation and "
        "network scores, read from the stage outputs under params.yaml paths.reports.",
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.set_defaults(func=_run_summary)


def _run_summary(args: argparse.Namespace) -> int:
    from rosmap_geneformer.analysis.headline import headline
    from rosmap_geneformer.params import read_params

    params = read_params(args.params)
    print(headline(params.paths.reports, sorted(params.section("tasks"))))
    return 0


def _add_schema(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "schema",
        help="write the JSON Schema of params.yaml (params.schema.json, for editors)",
        description="The typed params schema (params_schema.py) as JSON Schema. params.yaml names "
        "it in its first line, so YAML editors complete keys and flag wrong values.",
    )
    parser.add_argument("--output", type=Path, default=Path("params.schema.json"), help="file")
    parser.set_defaults(func=_run_schema)


def _run_schema(args: argparse.Namespace) -> int:
    from rosmap_geneformer.io import atomic_output
    from rosmap_geneformer.params_schema import json_schema

    with atomic_output(args.output) as tmp:
        tmp.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
    print(f"{args.output}: JSON Schema of params.yaml written")
    return 0


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_tokenize,
    _add_dictionaries,
    _add_summary,
    _add_schema,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="rosmap-geneformer",
        description="ROSMAP snRNA-seq -> Geneformer tools (the DVC pipeline uses the same code).",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback when an input is refused"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rosmap-geneformer`` command.

    Bad input (files, columns, values) is reported as one line on stderr with exit status 2.
    """
    from rosmap_geneformer.errors import InputError, report_input_error
    from rosmap_geneformer.logs import setup_logging

    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    setup_logging()
    try:
        return args.func(args)
    except InputError as error:
        return report_input_error(f"rosmap-geneformer {args.command}", arguments, error)


if __name__ == "__main__":
    sys.exit(main())
