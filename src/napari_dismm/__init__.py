"""napari-dismm: disentangled multi-modal learning of histology and transcriptomics."""

__version__ = "0.1.0"
