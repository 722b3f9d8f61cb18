"""Cancel checked inside an encoder's forward pass, so batches can stay large.

Why: a widget that must stop within a second used to encode in chunks of 4 patches
(polling between them), which costs throughput on a CPU. Here every submodule's forward
pre-hook polls ``cancel`` instead: a batch of 32 is one forward pass, and a cancel is seen
at the next layer (milliseconds), not after the batch. The hooks live only for the
duration of one call, so an encoder shared by later runs keeps no trace of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def polled_inside(model: Any, cancel: Callable[[], bool] | None, error: Callable[[], Exception]) -> Iterator[None]:
    """Within the block, each submodule of ``model`` raises ``error()`` before its forward
    once ``cancel()`` is true. No-op for ``cancel=None`` or a model without ``modules()``."""
    modules = getattr(model, "modules", None)
    if cancel is None or modules is None:
        yield
        return

    def hook(_module, _inputs) -> None:
        if cancel():
            raise error()

    handles = [module.register_forward_pre_hook(hook) for module in modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
