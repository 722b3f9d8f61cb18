"""Reading a user's weight file safely and checking it against a module before loading.

Weight files come from many places (timm, Hugging Face, torchvision, CLAM, training
scripts wrapped in DataParallel). Everything here exists so that a file of the right
architecture loads whatever its layout, and a file of the wrong one is refused with a
message that says *what* does not fit — never silently half-loaded, never unpickled.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from napari_dismm.errors import ModelConfigError

StateDict = dict[str, torch.Tensor]

# Prefixes added by wrappers (DataParallel, Lightning, SSL frameworks, HF task heads).
KNOWN_PREFIXES: tuple[str, ...] = (
    "module.",
    "model.",
    "backbone.",
    "encoder.",
    "trunk.",
    "teacher.",
    "student.",
    "vit.",
)
# Keys under which training scripts nest the actual state dict.
_NESTING_KEYS: tuple[str, ...] = ("state_dict", "model", "model_state_dict", "teacher", "student")
_IGNORED_SUFFIXES: tuple[str, ...] = ("num_batches_tracked",)


def file_sha256(path: str | Path, *, length: int = 16) -> str:
    """Short sha256 of a file's bytes: the provenance a feature file records."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def read_state_dict(path: str | Path) -> StateDict:
    """Read tensors from `.safetensors` or a torch file, refusing anything needing unpickling.

    A torch file is opened with ``weights_only=True``: a pickle that carries a custom
    class (arbitrary code) is refused with a ModelConfigError, not executed.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelConfigError(f"encoder weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: object = load_file(str(path), device="cpu")
        except SafetensorError as exc:
            raise ModelConfigError(f"{path.name} is not a readable safetensors file: {exc}") from exc
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            why = (
                f"it holds the Python object {found.group(1)}, which would need unpickling"
                if found
                else "it is corrupt or holds objects that would need unpickling"
            )
            raise ModelConfigError(
                f"refusing to load {path.name}: {why} (only plain state dicts or .safetensors are read)"
            ) from exc
        except (RuntimeError, EOFError, ValueError) as exc:
            raise ModelConfigError(f"{path.name} is not a readable torch weight file: {exc}") from exc
    return _as_state_dict(raw, source=path.name)


def _as_state_dict(raw: object, *, source: str) -> StateDict:
    """Unwrap one level of nesting ({"state_dict": {...}}) and keep the tensors."""
    if not isinstance(raw, Mapping):
        raise ModelConfigError(f"{source} holds a {type(raw).__name__}, not a state dict")
    if not any(isinstance(v, torch.Tensor) for v in raw.values()):
        for key in _NESTING_KEYS:
            inner = raw.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                raw = inner
                break
        else:
            raise ModelConfigError(f"{source} contains no tensors (keys: {_preview(raw.keys())})")
    return {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def strip_prefixes(state: StateDict, *, anchors: Iterable[str], depth: int = 4) -> StateDict:
    """Find the sub-dict whose keys start where our module's keys start.

    `anchors` are key beginnings found only at the top of the architecture (e.g.
    ``"conv1."``, ``"patch_embed."``). Wrapper prefixes (``module.``, ``backbone.``, ...,
    or one first component shared by every key) are peeled off until an anchor shows;
    keys outside the chosen prefix (a wrapper's projection head) are left behind. Keys
    that already start with an anchor are never touched, so a real sub-module called
    ``encoder.`` (as in the Hugging Face ViT) is not mangled.
    """
    anchors = tuple(anchors)
    if depth == 0 or any(k.startswith(anchors) for k in state):
        return state
    firsts = {k.split(".", 1)[0] + "." for k in state if "." in k}
    candidates = list(KNOWN_PREFIXES) + (sorted(firsts) if len(firsts) == 1 else [])
    for prefix in candidates:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            found = strip_prefixes(sub, anchors=anchors, depth=depth - 1)
            if any(k.startswith(anchors) for k in found):
                return found
    return state


def fit_problems(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps ``given`` from loading into a module whose state dict is ``expected``
    (missing, unexpected, mis-shaped keys); empty when it fits. BatchNorm counters are optional."""
    expected = {k: v for k, v in expected.items() if not k.endswith(_IGNORED_SUFFIXES)}
    given = {k: v for k, v in given.items() if not k.endswith(_IGNORED_SUFFIXES)}
    missing = [k for k in expected if k not in given]  # in module order: the first is telling
    unexpected = [k for k in given if k not in expected]
    mismatched = sorted(
        f"{k} {tuple(given[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(given)
        if given[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_preview(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_preview(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({_preview(mismatched)})")
    return problems


def load_checked(model: nn.Module, state: StateDict, *, source: str) -> None:
    """Load `state` into `model` only if every tensor fits; otherwise say exactly what differs.

    BatchNorm's ``num_batches_tracked`` counters are optional (safetensors exports often
    drop them); every other parameter and buffer must be present with the right shape.
    Half-precision files are cast to the module's dtype (float32).
    """
    problems = fit_problems(model.state_dict(), state)
    if problems:
        raise ModelConfigError(f"{source} does not fit this architecture: " + "; ".join(problems))
    # Counters absent from the file keep the module's own value, so the load can be strict.
    full = dict(model.state_dict())
    full.update(state)
    model.load_state_dict({k: full[k] for k in model.state_dict()}, strict=True)


def _preview(items: Iterable[object], *, limit: int = 4) -> str:
    items = [str(i) for i in items]
    more = f", ... +{len(items) - limit}" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
