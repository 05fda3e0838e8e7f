"""The outputs of an inferred network: the strongest edges, the graph, GraphML and the plots."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer.analysis.grn.scoring import pr_curve, score_ranking


def top_edges(edges: pd.DataFrame, per_regulator: int) -> pd.DataFrame:
    """The strongest ``per_regulator`` edges of each regulator (edges sorted by weight)."""
    ordered = edges.sort_values(
        ["regulator", "weight", "target"], ascending=[True, False, True], kind="stable"
    )
    return ordered.groupby("regulator", sort=True).head(per_regulator).reset_index(drop=True)


def network_graph(edges: pd.DataFrame) -> Any:
    """A ``networkx.DiGraph`` of edges: nodes are Ensembl ids with ``symbol`` and ``regulator``
    attributes, edges carry ``weight``, ``n_cells`` and ``coexpression``."""
    import networkx as nx

    graph = nx.DiGraph()
    regulators = set(edges["regulator_id"])
    for role in ("regulator", "target"):
        for gene, symbol in zip(edges[f"{role}_id"], edges[f"{role}_symbol"], strict=True):
            if gene not in graph:
                graph.add_node(gene, symbol=str(symbol or gene), regulator=gene in regulators)
    for row in edges.itertuples(index=False):
        coexpression = float(row.coexpression) if pd.notna(row.coexpression) else 0.0
        graph.add_edge(
            row.regulator_id,
            row.target_id,
            weight=float(row.weight),
            n_cells=int(row.n_cells),
            coexpression=coexpression,
        )
    return graph


def write_graphml(graph: Any, path: str | Path) -> None:
    """Write a graph as GraphML, atomically."""
    import networkx as nx

    from rosmap_geneformer.io import atomic_output

    with atomic_output(path) as tmp:
        nx.write_graphml(graph, tmp)


def plot_network(edges: pd.DataFrame, *, seed: int, title: str) -> Any:
    """Draw the given edges (regulators in orange, edge width by weight)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    graph = network_graph(edges)
    fig, ax = plt.subplots(figsize=(9, 8))
    if graph.number_of_nodes():
        layout = nx.spring_layout(graph, seed=seed, k=0.6 / np.sqrt(graph.number_of_nodes()))
        is_reg = [graph.nodes[n]["regulator"] for n in graph.nodes]
        weights = np.array([d["weight"] for _, _, d in graph.edges(data=True)])
        widths = 0.5 + 3.0 * (weights - weights.min()) / (np.ptp(weights) or 1.0)
        nx.draw_networkx_edges(
            graph, layout, ax=ax, width=widths, alpha=0.5, arrowsize=6, edge_color="#555555"
        )
        nx.draw_networkx_nodes(
            graph,
            layout,
            ax=ax,
            node_size=[260 if r else 60 for r in is_reg],
            node_color=["#ff7f0e" if r else "#9ecae1" for r in is_reg],
        )
        nx.draw_networkx_labels(
            graph,
            layout,
            labels={n: graph.nodes[n]["symbol"] for n in graph.nodes},
            font_size=6,
            ax=ax,
        )
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    return fig


def plot_pr_epr(
    scoring: Mapping[str, np.ndarray], evaluation: Mapping[str, Any], *, title: str
) -> Any:
    """Precision-recall curves of every method (all edges) and their early precision ratios
    with the bootstrap intervals, all edges and TF regulators only.

    Parameters
    ----------
    scoring
        ``labels`` and method -> score per edge.
    evaluation
        The stage summary's ``evaluation`` (its ``scopes``).
    title
        Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = scoring["labels"]
    names = [n for n in scoring if n != "labels"]
    fig, (pr, epr) = plt.subplots(1, 2, figsize=(11, 4.5), width_ratios=(1, 1.1))
    for name in names:
        recall, precision = pr_curve(labels, scoring[name])
        auprc = score_ranking(labels, scoring[name], k_values=())["auprc"]
        pr.plot(recall, precision, label=f"{name} (AUPRC {auprc:.3f})", linewidth=1.2)
    pr.axhline(labels.mean(), color="#999999", linestyle="--", linewidth=0.8, label="prevalence")
    pr.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    pr.set_title("all candidate edges", fontsize=9)
    pr.legend(fontsize=7)
    scopes = list(evaluation["scopes"])
    width = 0.8 / len(scopes)
    x = np.arange(len(names))
    for i, scope in enumerate(scopes):
        table = evaluation["scopes"][scope]
        values = np.array([table[n]["epr"] for n in names], dtype=float)
        bounds = np.array([table[n]["interval"]["epr"] for n in names], dtype=float)
        errors = np.abs(np.vstack([values - bounds[:, 0], bounds[:, 1] - values]))
        errors = np.nan_to_num(errors)
        label = "all edges" if scope == "all" else "TF regulators"
        epr.bar(x + (i - (len(scopes) - 1) / 2) * width, values, width, label=label)
        epr.errorbar(
            x + (i - (len(scopes) - 1) / 2) * width,
            values,
            yerr=errors,
            fmt="none",
            ecolor="#333333",
            elinewidth=0.8,
            capsize=2,
        )
    epr.axhline(1.0, color="#999999", linestyle="--", linewidth=0.8)
    epr.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    epr.set_ylabel("early precision ratio (1 = random)")
    epr.set_title("EPR, 95% interval over regulators", fontsize=9)
    epr.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
