"""Transcriptomics input: gene sets (GMT), expression tables, normalisation.

``load_omics`` is the one entry point the CLI and training use; the pieces are
importable for finer control.
"""

from napari_dismm.omics.expression import ExpressionTable, read_expression
from napari_dismm.omics.genesets import GeneSets, build_gene_sets, default_gene_sets_path, load_gene_sets
from napari_dismm.omics.gmt import GeneSet, read_gmt
from napari_dismm.omics.load import load_omics
from napari_dismm.omics.normalise import ExpressionNormaliser

__all__ = [
    "ExpressionNormaliser",
    "ExpressionTable",
    "GeneSet",
    "GeneSets",
    "build_gene_sets",
    "default_gene_sets_path",
    "load_gene_sets",
    "load_omics",
    "read_expression",
    "read_gmt",
]
