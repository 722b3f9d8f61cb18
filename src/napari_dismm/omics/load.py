"""One call from files to gene sets and an expression table, with every check up front.

Problems that would otherwise surface deep in training (a subspace with no gene in the
table, a log-transformed table about to be log1p'ed again) fail here with one clear line.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import numpy as np

from napari_dismm.errors import DataError, DismmWarning
from napari_dismm.omics.expression import ExpressionTable, read_expression, warn_report
from napari_dismm.omics.genesets import GeneSets, load_gene_sets


def load_omics(
    table_path: str | os.PathLike[str],
    gmt_path: str | os.PathLike[str] | None = None,
    *,
    mapping: Mapping[str, str] | None = None,
    log1p: bool = True,
) -> tuple[GeneSets, ExpressionTable]:
    """Read gene sets (the shipped default when ``gmt_path`` is None) and the expression table.

    ``log1p`` says whether the table holds raw, non-negative values to be log1p'ed by
    :class:`~napari_dismm.omics.normalise.ExpressionNormaliser`; it is checked here.
    Genes of the sets missing from the table are warned about (they are imputed later);
    a subspace with no gene in the table is an error.
    """
    gene_sets = load_gene_sets(gmt_path, mapping=mapping)
    table = read_expression(table_path, genes=gene_sets.genes)
    warn_report(table)
    for name, genes in gene_sets.groups().items():
        missing = table.missing(genes)
        if len(missing) == len(genes):
            raise DataError(f"{table.source}: none of the {len(genes)} {name} genes is in the table")
        if missing:
            shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
            warnings.warn(
                f"{table.source}: {len(missing)} of {len(genes)} {name} genes not in the table: {shown}",
                DismmWarning,
                stacklevel=2,
            )
    if log1p and table.values.size and np.nanmin(table.values) < 0:
        r, c = np.unravel_index(np.nanargmin(table.values), table.values.shape)
        raise DataError(
            f"{table.source}: negative value {table.values[r, c]:.4g} (gene {table.columns[c]}, patient "
            f"{table.patients[r]}): the table looks already log-transformed or z-scored; "
            "use log1p=False (--no-log1p)"
        )
    return gene_sets, table
