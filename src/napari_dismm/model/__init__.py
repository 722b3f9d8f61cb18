"""The DisMM models: pure torch (plus numpy and einops), no file formats except the
checkpoint module. Import submodules directly, e.g. ``from napari_dismm.model.registry
import build_model``; this file stays empty so importing one model never pulls in all."""
