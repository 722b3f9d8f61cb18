"""Worker for the two-process gloo DDP test of CGC (kept apart from the test module so the
spawned processes import only torch and the model package)."""

import numpy as np
import torch

from napari_dismm.model.cgc import CGCStep
from napari_dismm.model.heads import SubspaceFusionHead
from napari_dismm.model.losses import task_loss


class HeadOnly(torch.nn.Module):
    """Learnable per-sample features feeding a fusion head (so gradients can conflict)."""

    def __init__(self, d=4, c=3):
        super().__init__()
        self.head = SubspaceFusionHead(task="classification", d=d, n_outputs=c)
        self.fusion_heads = {"10x": self.head}

    def forward(self, f_t, f_e):
        return self.head(f_t, f_e)


def head_data(seed=3, n=8, d=4):
    g = torch.Generator().manual_seed(seed)
    f_t = torch.randn(n, d, generator=g)
    f_e = -f_t + 0.3 * torch.randn(n, d, generator=g)  # pushes the blocks' gradients apart
    # seed 3: rank 1 alone finds TME more confident, the whole batch finds tumor more
    # confident, so only summed confidences reproduce the single-process decision
    y = torch.randint(0, 3, (n,), generator=g)
    return f_t, f_e, y


def teacher_and_data():
    from napari_dismm.model.teacher import Teacher, TeacherConfig
    from tests.model.model_helpers import make_batch

    torch.manual_seed(0)
    model = Teacher(TeacherConfig(d_in=8, d=8, n_heads=2, n_tumor_genes=3, n_tme_genes=4, dropout=0.0, gene_dropout=0.0, slide_head=False,
                                  n_outputs=3))
    batch = make_batch([6, 6, 6, 6], [10, 10, 10, 10], d_in=8, n_tumor=3, n_tme=4, seed=5)
    return model, batch, torch.tensor([0, 2, 1, 2])


def step_head(model, f_t, f_e, y, heads):
    loss = task_loss(model(f_t, f_e), y, task="classification")
    cgc = CGCStep(heads, task="classification")
    cgc.observe({"10x": {"tumor": f_t, "tme": f_e}}, y)
    loss.backward()
    return cgc.apply()["10x"]


def step_teacher(model, batch, y, rows, heads):
    out = model({m: b[rows] for m, b in batch["bags"].items()}, coords={m: c[rows] for m, c in batch["coords"].items()},
                genes={u: g[rows] for u, g in batch["genes"].items()})
    loss = task_loss(out.logits, y[rows], task="classification")
    cgc = CGCStep(heads, task="classification")
    cgc.observe(out.features, y[rows])
    loss.backward()
    return cgc.apply()


def worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        f_t, f_e, y = head_data()
        rows = slice(rank * 4, rank * 4 + 4)
        torch.manual_seed(0)
        local = HeadOnly()
        ddp = DDP(local)
        report = step_head(ddp, f_t[rows], f_e[rows], y[rows], local.fusion_heads)
        np.save(f"{out_dir}/head_{rank}.npy", local.head.linear.weight.grad.numpy())
        np.save(f"{out_dir}/head_report_{rank}.npy", np.array([report.cosine, report.projected == "tme"]))

        model, batch, yt = teacher_and_data()
        ddp = DDP(model)
        rows = torch.arange(rank * 2, rank * 2 + 2)
        step_teacher(ddp, batch, yt, rows, model.fusion_heads)
        grads = {k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None}
        np.savez(f"{out_dir}/teacher_{rank}.npz", **grads)
    finally:
        dist.destroy_process_group()


