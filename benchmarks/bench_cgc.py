"""Cost of CGC: one teacher training step with CGC / without CGC (goal <= 1.15).

Same model, same batch; steps with and without CGC are interleaved so machine-load drift
hits both equally; the ratio is of the medians. Run: python benchmarks/bench_cgc.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from napari_dismm.model.cgc import CGCStep
from napari_dismm.model.losses import task_loss
from napari_dismm.model.teacher import Teacher, TeacherConfig


def make_batch(batch: int, n10: int, n20: int, config: TeacherConfig) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "bags": {"10x": torch.randn(batch, n10, config.d_in, generator=g), "20x": torch.randn(batch, n20, config.d_in, generator=g)},
        "genes": {"tumor": torch.randn(batch, config.n_tumor_genes, generator=g), "tme": torch.randn(batch, config.n_tme_genes, generator=g)},
        "target": torch.randint(0, config.n_outputs, (batch,), generator=g),
    }


def cgc_only(model: Teacher, data: dict) -> float:
    """The CGC work alone (confidences + projection) on gradients already in place."""
    out = model(data["bags"], genes=data["genes"])
    sum(out.per_magnification_logits.values()).sum().backward()
    features = {m: {u: f.detach() for u, f in fs.items()} for m, fs in out.features.items()}
    start = time.perf_counter()
    coordinator = CGCStep(model.fusion_heads, task="classification")
    coordinator.observe(features, data["target"])
    coordinator.apply()
    return time.perf_counter() - start


def step(model: Teacher, optimiser: torch.optim.Optimizer, data: dict, *, cgc: bool) -> float:
    start = time.perf_counter()
    out = model(data["bags"], genes=data["genes"])
    loss = sum(task_loss(l, data["target"], task="classification") for l in out.per_magnification_logits.values())
    coordinator = CGCStep(model.fusion_heads, task="classification") if cgc else None
    if coordinator:
        coordinator.observe(out.features, data["target"])
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if coordinator:
        coordinator.apply()
    optimiser.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--n10", type=int, default=500)
    parser.add_argument("--n20", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = TeacherConfig()  # reference sizes: d_in 1024, d 128, 59 / 361 genes
    model = Teacher(config).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = make_batch(args.batch, args.n10, args.n20, config)
    for _ in range(3):  # warm-up
        step(model, optimiser, data, cgc=True)
        step(model, optimiser, data, cgc=False)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.steps):
        order = (True, False) if i % 2 == 0 else (False, True)
        for flag in order:
            times[flag].append(step(model, optimiser, data, cgc=flag))
    with_cgc, without = statistics.median(times[True]), statistics.median(times[False])
    print(f"teacher step, B={args.batch}, N10={args.n10}, N20={args.n20}, d_in={config.d_in}, d={config.d}, "
          f"threads={torch.get_num_threads()}, {args.steps} steps each")
    print(f"median step with CGC    : {with_cgc * 1e3:8.2f} ms")
    print(f"median step without CGC : {without * 1e3:8.2f} ms")
    print(f"ratio with / without    : {with_cgc / without:8.3f}  (goal <= 1.15)")
    alone = statistics.median(cgc_only(model, data) for _ in range(20))
    print(f"CGC work alone (median) : {alone * 1e3:8.3f} ms = {alone / without:.4f} of a step")


if __name__ == "__main__":
    main()
