"""The two training stages of DisMM: stage I (``supervised``: the multi-modal teacher and the
baselines, trained on the task) and stage II (``distillation``: the WSI-only student taught
by a frozen teacher). Both train through :mod:`training.engine`."""
