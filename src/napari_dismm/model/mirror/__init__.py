"""MIRROR (METHOD.md section 2): slide and RNA encoders pretrained without labels.

``model`` holds the pretraining model and its WSI-only probe, ``encoders`` the slide and
RNA encoders, ``losses`` the pretraining losses as plain functions of tensors.
"""

from napari_dismm.model.mirror.model import Mirror, MirrorConfig, StyleClustering

__all__ = ["Mirror", "MirrorConfig", "StyleClustering"]
