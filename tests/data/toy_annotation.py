"""A small hand-made gene annotation with every priority rule of the gene map in it.

Shared by ``test_gene_map.py`` and ``test_convert_genes.py``; ``G`` maps each toy gene to its id.
"""

from __future__ import annotations

import pandas as pd


def ensembl_id(n: int) -> str:
    return f"ENSG{n:011d}"


G = {
    name: ensembl_id(i)
    for i, name in enumerate(
        [
            "AAA",
            "BBB",
            "DUP",
            "DUPPATCH",
            "TWIN1",
            "TWIN2",
            "PATCHY",
            "PATCHYP",
            "MTCO1",
            "CCC",
            "DDD",
        ],
        start=1,
    )
}


def toy_annotation() -> pd.DataFrame:
    """Indexed by Ensembl id, shaped like ``load_bundled_annotation()``."""
    rows = [
        # id,           gene_name, chrom,            approved, previous,      aliases
        (G["AAA"], "AAA", "1", "AAA", "OLD1, PA", "ALS, SHARED_ALIAS, TWIN"),
        (G["BBB"], "BBB", "2", "BBB2", "BBB", "SHARED_ALIAS"),
        (G["DUP"], "DUP", "3", "DUP", "", ""),
        (G["DUPPATCH"], "DUP", "CHR_HSCHR3_1_CTG1", "", "", ""),
        (G["TWIN1"], "TWIN", "5", "", "", ""),
        (G["TWIN2"], "TWIN", "6", "", "", ""),
        (G["PATCHY"], "PATCHY", "7", "", "", ""),
        (G["PATCHYP"], "PATCHY", "CHR_HSCHR7_2_CTG6", "", "", ""),
        (G["MTCO1"], "MT-CO1", "MT", "MT-CO1", "MTCO1", ""),
        (G["CCC"], "CCC", "10", "CCC", "OLD2", "AAA, PA"),
        (G["DDD"], "DDD", "11", "DDD", "OLD2", ""),
    ]
    frame = pd.DataFrame(
        rows,
        columns=[
            "ensembl_id",
            "gene_name",
            "Chromosome",
            "approved_symbol",
            "previous_symbols",
            "alias_symbols",
        ],
    )
    return frame.set_index("ensembl_id")
