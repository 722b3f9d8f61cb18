"""Headless analysis of subspace disentanglement (issue 7): similarity of the tumor and TME
features, 10x-vs-20x attention consistency, gene attribution, projections, figures.

numpy / torch / sklearn / matplotlib (Agg) only; nothing here imports napari or Qt.
"""
