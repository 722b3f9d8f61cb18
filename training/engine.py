"""The loop every model trains through: epochs, early stopping, checkpoint and resume, test once.

Why one loop: the teacher, the student and the baselines differ only in their loss (an
:class:`Objective`); sharing seeding, batching, model selection and the files written
makes their numbers comparable and the resume guarantee hold for all of them.

Determinism (CPU): the model is initialised under a seed derived from (seed, model,
fold); each epoch reseeds torch (dropout) and the data order (``ddp.epoch_batches``) from
(seed, model, fold, epoch), and patch subsampling is seeded by the dataset from
(seed, epoch). So an epoch's result depends only on the state at its start, which the
checkpoint stores in full (weights, optimizer moments, best state, history, counters):
a run killed after any epoch and restarted ends bit-identical to an uninterrupted one.

Checkpoint: ``checkpoint/state.safetensors`` holds every tensor (``model.*``, ``best.*``,
``optim.<param>.<key>``, ``rng``) and, in its metadata, the JSON of the scalars; it is
written to a temp name and renamed, so a kill never leaves half a checkpoint.
``checkpoint/state.json`` repeats the scalars for people. No pickles.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, safe_open, save
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from napari_dismm.errors import DataError, DismmWarning
from napari_dismm.model.checkpoint import save_model
from napari_dismm.model.probes import own_outputs
from napari_dismm.model.losses import task_loss
from training.dataset import Batch, FoldData, SlideDataset, collate_bags
from training.ddp import SINGLE, DistContext, all_reduce_mean, barrier, epoch_batches, wrap
from training.metrics import by_patient, classification_metrics, survival_metrics, write_history

STATE = "state.safetensors"
_BARS: ContextVar[bool] = ContextVar("dismm_training_bars", default=False)


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[None]:
    """Within the block, every fold trained on the main process shows a bar on stderr:
    epochs done of the maximum, the running and validation losses, and an ETA (an upper
    bound when early stopping ends a fold sooner). Why a context: the stage modules call
    :func:`train_fold` without knowing whether a person is watching."""
    token = _BARS.set(enabled)
    try:
        yield
    finally:
        _BARS.reset(token)


def _fold_bar(name: str, fold: int, settings: LoopSettings, done: int, *, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=settings.epochs, initial=done, desc=f"{name} fold {fold}", unit="epoch", file=sys.stderr,
                dynamic_ncols=True, leave=True)


def seed_for(*parts: object) -> int:
    """A 31-bit seed from any parts (stable across runs and Python processes)."""
    return zlib.crc32("\0".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def set_determinism() -> None:
    """Deterministic kernels where torch has them (warn, do not fail, where it has not)."""
    torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass(frozen=True)
class LoopSettings:
    epochs: int
    lr: float
    weight_decay: float
    patience: int
    batch_size: int
    select_on: str = "loss"
    seed: int = 0
    ema: float = 0.0  # decay per step of the weights' moving average (0 = the last step's weights)


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """The exponential moving average of ``model``'s parameters (buffers stay as they are
    when it is made), or None for ``decay`` 0. Why: with ~40 training patients the validation
    AUC can jump by 0.4 between epochs and selection picks a lucky one; the average is a
    smoother model for validation to judge and the fold to keep. Off by default: the decay
    counts steps, so its horizon depends on the cohort's size (README)."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


class Objective(Protocol):
    """A model's training loss: ``train_loss`` before backward, ``after_backward`` before the step.

    An objective whose terms depend on the epoch (a warm-up) may also define
    ``set_epoch(epoch)``; the loop calls it before each epoch, also after a resume."""

    task: str

    def train_loss(self, net: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]: ...

    def after_backward(self) -> dict[str, float]: ...


# -- prediction -------------------------------------------------------------------------------


@dataclass
class Predictions:
    """Per-slide outputs of one dataset, in dataset order."""

    slide_ids: list[str]
    patient_ids: list[str]
    logits: np.ndarray  # (n, C)
    target: np.ndarray  # (n,) class or time bin
    probabilities: np.ndarray | None = None  # (n, C)
    risk: np.ndarray | None = None  # (n,)
    survival: np.ndarray | None = None  # (n, bins)
    event: np.ndarray | None = None
    time: np.ndarray | None = None
    attention: list[dict[str, dict[str, np.ndarray]]] = field(default_factory=list)  # per slide, unpadded
    bin_edges: np.ndarray | None = None  # survival: survival[:, k] is S(bin_edges[k + 1])


def iterate(dataset: SlideDataset, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]


@torch.no_grad()
def predict(
    model: nn.Module, dataset: SlideDataset, *, batch_size: int = 8, device: torch.device | str = "cpu",
    attention: bool = False, own: bool = False,
) -> Predictions:
    """Eval-mode forward over whole bags (no subsampling), in dataset order. ``own``: a
    model's own outputs, without its frozen probes (model/probes.py), as training reads them."""
    was_training = model.training
    model.eval()
    rows: dict[str, list[Any]] = {k: [] for k in ("logits", "target", "probabilities", "risk", "survival", "event", "time")}
    slides, patients, maps = [], [], []
    for idx in iterate(dataset, batch_size):
        batch = collate_bags([dataset[i] for i in idx]).to(device)
        out = model(batch.bags, **batch.model_kwargs(), **(own_outputs(model) if own else {}))
        slides += batch.slide_ids
        patients += batch.patient_ids
        rows["logits"].append(out.logits.float().cpu())
        rows["target"].append(batch.target.cpu())
        for key in ("probabilities", "risk", "survival"):
            value = getattr(out, key)
            if value is not None:
                rows[key].append(value.float().cpu())
        if batch.event is not None:
            rows["event"].append(batch.event.cpu())
            rows["time"].append(batch.time.cpu())
        if attention:
            for b in range(len(batch)):
                maps.append({
                    mag: {name: a[b][batch.masks[mag][b]].cpu().numpy() for name, a in per.items()}
                    for mag, per in out.attention.items()
                })
    model.train(was_training)
    cat = {k: (torch.cat(v).numpy() if v else None) for k, v in rows.items()}
    return Predictions(slides, patients, cat["logits"], cat["target"], cat["probabilities"], cat["risk"],
                       cat["survival"], cat["event"], cat["time"], maps, dataset.bin_edges)


def prediction_loss(pred: Predictions, *, task: str, class_weights: Tensor | None) -> float:
    """The task loss of the combined logits (what model selection on "loss" compares)."""
    events = None if pred.event is None else torch.from_numpy(pred.event)
    loss = task_loss(torch.from_numpy(pred.logits), torch.from_numpy(pred.target), task=task,
                     events=events, class_weights=class_weights)
    return float(loss)


def score(pred: Predictions, *, task: str) -> dict[str, float]:
    """Patient-level metrics (a patient's slides averaged first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DismmWarning)
        if task == "classification":
            patients, probs = by_patient(pred.patient_ids, pred.probabilities)
            _, target = by_patient(pred.patient_ids, pred.target.astype(float))
            return classification_metrics(y_true=target.astype(np.int64), probs=probs)
        _, risk = by_patient(pred.patient_ids, pred.risk)
        _, time = by_patient(pred.patient_ids, pred.time)
        _, event = by_patient(pred.patient_ids, pred.event)
        if len(risk) < 2:
            return {"c_index": float("nan"), "logrank_p": float("nan")}
        curves = None if pred.survival is None or pred.bin_edges is None else by_patient(pred.patient_ids, pred.survival)[1]
        at = None if curves is None else np.asarray(pred.bin_edges, dtype=float)[1:]
        return survival_metrics(times=time, events=event.astype(np.int64), risks=risk, survival=curves, at=at)


def main_metric(task: str) -> str:
    return "auc" if task == "classification" else "c_index"


def predictions_frame(pred: Predictions, *, task: str, class_names: Sequence[str] = ()) -> pd.DataFrame:
    frame = pd.DataFrame({"slide_id": pred.slide_ids, "patient_id": pred.patient_ids})
    if task == "classification":
        frame["label"] = [class_names[t] if class_names else int(t) for t in pred.target]
        for c in range(pred.probabilities.shape[1]):
            frame[f"prob_{class_names[c] if class_names else c}"] = pred.probabilities[:, c]
    else:
        frame["time"], frame["event"], frame["time_bin"] = pred.time, pred.event.astype(int), pred.target
        frame["risk"] = pred.risk
        for k in range(pred.survival.shape[1]):
            frame[f"survival_{k}"] = pred.survival[:, k]
    return frame


# -- checkpoint ---------------------------------------------------------------------------------


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_checkpoint(directory: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    best: dict[str, Tensor], info: dict[str, Any], average: AveragedModel | None = None) -> None:
    """Everything the next epoch depends on, in one safetensors file renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.contiguous() for k, v in _state(model).items()}
    if average is not None:
        tensors.update({f"average.{k}": v.contiguous() for k, v in _state(average).items()})
    tensors.update({f"best.{k}": v.contiguous() for k, v in best.items()})
    opt = optimizer.state_dict()
    for pid, per in opt["state"].items():
        for key, value in per.items():
            tensors[f"optim.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng"] = torch.get_rng_state()
    scalars = {**info, "param_groups": opt["param_groups"]}
    text = json.dumps(scalars, default=_json_default)
    tmp = directory / f".state.{uuid.uuid4().hex}.tmp"  # plain open(): the umask applies
    try:
        tmp.write_bytes(save(tensors, metadata={"format": "pt", "scalars": text}))
        os.replace(tmp, directory / STATE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    (directory / "state.json").write_text(json.dumps(json.loads(text), indent=1) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def load_checkpoint(directory: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    average: AveragedModel | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Restore model, optimizer (and the weights' average) in place; returns (best state, scalars)."""
    path = directory / STATE
    with safe_open(str(path), framework="pt") as handle:
        scalars = json.loads(handle.metadata()["scalars"])
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if average is not None:
        saved = {k[8:]: v for k, v in tensors.items() if k.startswith("average.")}
        if not saved:
            raise DataError(f"{path} was written without a weight average ([cv] weight_ema): resume with the "
                            "configuration it was started with or use a new --out")
        average.load_state_dict(saved)
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": scalars.pop("param_groups")})
    torch.set_rng_state(tensors["rng"])
    return best, scalars


# -- the fold loop --------------------------------------------------------------------------------


@dataclass
class FoldOutcome:
    metrics: dict[str, float]
    best_epoch: int
    epochs_run: int
    history: list[dict[str, Any]]
    test: Predictions | None = None
    skipped: bool = False


def _better(value: float, best: float | None, select_on: str) -> bool:
    if not math.isfinite(value):
        return best is None
    if best is None or not math.isfinite(best):
        return True
    return value < best if select_on == "loss" else value > best


def train_fold(
    *,
    model: nn.Module,
    objective: Objective,
    data: FoldData,
    settings: LoopSettings,
    fold_dir: Path,
    name: str,
    fold: int,
    extras: dict[str, Any],
    class_weights: Tensor | None = None,
    class_names: Sequence[str] = (),
    ctx: DistContext = SINGLE,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    finalize: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> FoldOutcome:
    """Train one model on one fold, select on validation, test once; resume if possible.

    ``finalize`` runs on the selected model before its test pass and may change it in
    place (without changing its predictions, e.g. renaming subspaces); what it returns
    goes into ``best/config.json`` too. It runs before ``metrics.json`` is written, so a
    killed run never leaves a finished fold that skipped it.

    A fold whose ``metrics.json`` exists is finished and is read back, not retrained.
    ``extras`` go into ``best/config.json`` (gene lists, normaliser, bin edges, ...).
    """
    task = objective.task
    done = fold_dir / "metrics.json"
    if done.exists():
        saved = json.loads(done.read_text())
        return FoldOutcome(saved["test"], saved["best_epoch"], saved["epochs_run"], [], skipped=True)
    set_determinism()
    device = ctx.device
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    ckpt_dir = fold_dir / "checkpoint"
    info: dict[str, Any] = {"epoch": 0, "history": [], "best_score": None, "best_epoch": 0, "bad_epochs": 0,
                            "stopped": False, "world_size": ctx.world_size}
    best = _state(model)
    average = weight_average(model, settings.ema)
    resumed = (ckpt_dir / STATE).exists()
    if resumed:
        best, info = load_checkpoint(ckpt_dir, model=model, optimizer=optimizer, average=average)
    net = wrap(model, ctx)
    metric = main_metric(task)
    bar = _fold_bar(name, fold, settings, info["epoch"], show=ctx.is_main and _BARS.get())
    if bar is not None and resumed:
        bar.write(f"{name}: resuming fold {fold} at epoch {info['epoch'] + 1}", file=sys.stderr)
    try:
        best = _epochs(net=net, model=model, objective=objective, data=data, settings=settings, name=name, fold=fold,
                info=info, best=best, optimizer=optimizer, class_weights=class_weights, ctx=ctx, metric=metric,
                ckpt_dir=ckpt_dir, fold_dir=fold_dir, on_epoch=on_epoch, bar=bar, average=average)
    finally:
        if bar is not None:
            bar.close()
    model.load_state_dict(best)
    finalized = finalize(model) if finalize is not None else {}
    test = predict(model, data.test, batch_size=settings.batch_size, device=device)
    metrics = score(test, task=task)
    if ctx.is_main:
        write_history(info["history"], fold_dir / "history")
        predictions_frame(test, task=task, class_names=class_names).to_csv(fold_dir / "test_predictions.csv", index=False)
        save_model(model, fold_dir / "best",
                   extra={**extras, **finalized, "fold": fold, "best_epoch": info["best_epoch"]})
        document = {"model": name, "fold": fold, "task": task, "best_epoch": info["best_epoch"],
                    "epochs_run": info["epoch"], "n_test_patients": len(set(test.patient_ids)),
                    "test": {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}}
        tmp = done.with_name("metrics.json.tmp")
        tmp.write_text(json.dumps(document, indent=1) + "\n")
        os.replace(tmp, done)
    barrier(ctx)
    return FoldOutcome(metrics, info["best_epoch"], info["epoch"], info["history"], test)


def _epochs(*, net, model, objective, data, settings, name, fold, info, best, optimizer, class_weights, ctx,
            metric, ckpt_dir, fold_dir, on_epoch, bar, average=None) -> dict[str, Tensor]:
    """The epochs still to run (``info`` updated in place); returns the selected state
    (of the weights' average when there is one)."""
    judged = model if average is None else average.module
    task, device = objective.task, ctx.device
    said_undefined = False
    while info["epoch"] < settings.epochs and not info["stopped"]:
        epoch = info["epoch"]
        torch.manual_seed(seed_for(settings.seed, name, fold, epoch))
        data.train.set_epoch(epoch)
        if hasattr(objective, "set_epoch"):
            objective.set_epoch(epoch)
        net.train()
        sums: dict[str, float] = {}
        steps = epoch_batches(len(data.train), batch_size=settings.batch_size,
                              seed=seed_for(settings.seed, name, fold, "order"), epoch=epoch, ctx=ctx)
        for step, idx in enumerate(steps):
            batch = collate_bags([data.train[i] for i in idx]).to(device)
            optimizer.zero_grad(set_to_none=True)
            loss, parts = objective.train_loss(net, batch)
            loss.backward()
            parts.update(objective.after_backward())
            optimizer.step()
            if average is not None:
                average.update_parameters(model)
            for key, value in {"loss": float(loss.detach()), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value / len(steps)
            if bar is not None:
                bar.set_postfix_str(f"epoch {epoch + 1}: step {step + 1}/{len(steps)} loss {float(loss.detach()):.3f}")
        # selection judges the part the loop trains: a model's probes are fixed, and judged with
        # them the epoch was chosen before the attention had learnt (README, probes)
        val = predict(judged, data.val, batch_size=settings.batch_size, device=device, own=True)
        val_loss = prediction_loss(val, task=task, class_weights=class_weights)
        val_metric = score(val, task=task)[metric]
        row = {"epoch": epoch + 1, **{f"train_{k}": all_reduce_mean(v, ctx) for k, v in sums.items()},
               "val_loss": val_loss, f"val_{metric}": val_metric}
        # an objective may judge more than the task (stage II: the whole distillation objective)
        val_objective = None
        if settings.select_on == "loss" and hasattr(objective, "validation_loss"):
            val_objective = objective.validation_loss(judged, data.val, batch_size=settings.batch_size, device=device)
        if val_objective is not None:
            row["val_objective"] = val_objective
        value = val_metric if settings.select_on != "loss" else val_loss if val_objective is None else val_objective
        if _better(value, info["best_score"], settings.select_on):
            info["best_score"] = value if math.isfinite(value) else None
            info["best_epoch"], info["bad_epochs"] = epoch + 1, 0
            best = _state(judged)
        else:
            info["bad_epochs"] += 1
        info["history"].append(row)
        info["epoch"] = epoch + 1
        info["stopped"] = bool(settings.patience and info["bad_epochs"] >= settings.patience)
        if ctx.is_main:
            save_checkpoint(ckpt_dir, model=model, optimizer=optimizer, best=best, info=info, average=average)
            write_history(info["history"], fold_dir / "history")
            if not math.isfinite(val_metric) and not said_undefined:
                said_undefined = True
                _say(bar, f"{name} fold {fold}: val_{metric} is undefined (the validation part has one class"
                     f"{' or no event' if task == 'survival' else ''}); history.csv writes NaN"
                     f"{', model selection uses the validation loss' if settings.select_on == 'loss' else ''}")
        barrier(ctx)
        if bar is not None:
            bar.set_postfix_str(_losses_text(row, metric), refresh=False)
            bar.update(1)
        if on_epoch is not None:
            on_epoch(row)
    return best


def _losses_text(row: dict[str, Any], metric: str) -> str:
    """``loss 0.512 val_loss 0.498 val_auc 0.810`` for the bar (n/a where undefined)."""
    def shown(value: float) -> str:
        return f"{value:.3f}" if math.isfinite(value) else "n/a"

    return (f"loss {shown(row.get('train_loss', math.nan))} val_loss {shown(row['val_loss'])} "
            f"val_{metric} {shown(row.get(f'val_{metric}', math.nan))}")


def _say(bar, message: str) -> None:
    """A line on stderr that does not tear the bar (a warning when there is no bar)."""
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        warnings.warn(message, DismmWarning, stacklevel=3)
