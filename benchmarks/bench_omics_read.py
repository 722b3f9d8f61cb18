"""Reading a TCGA-sized expression table: two-pass selective read vs one full pandas read.

    python benchmarks/omics_read.py [--genes 20531] [--patients 500]

Writes a synthetic table (default gene-set symbols plus filler genes, gamma-distributed
values) in both orientations to a temp directory, then times, side by side in one run,
``load_omics`` (which parses only the ~1.3k gene-set genes) against a plain
``pandas.read_csv`` of the whole file followed by picking those genes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from napari_dismm.omics import load_gene_sets, load_omics


def _best_of(fn, repeat: int = 2) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--genes", type=int, default=20531)
    parser.add_argument("--patients", type=int, default=500)
    args = parser.parse_args()
    wanted = list(load_gene_sets().genes)
    genes = wanted + [f"FILLER{i}" for i in range(max(0, args.genes - len(wanted)))]
    samples = [f"TCGA-{i % 90:02d}-{i:04d}-01A-11R" for i in range(args.patients)]
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.gamma(2.0, 50.0, (len(genes), len(samples))).round(2), index=genes, columns=samples)
    with tempfile.TemporaryDirectory() as tmp:
        files = {"genes x patients": Path(tmp) / "gxp.tsv", "patients x genes": Path(tmp) / "pxg.tsv"}
        frame.rename_axis("gene").to_csv(files["genes x patients"], sep="\t")
        frame.T.rename_axis("sample").to_csv(files["patients x genes"], sep="\t")
        print(f"table: {len(genes)} genes x {len(samples)} patients, {len(wanted)} genes needed")
        for orientation, path in files.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours = _best_of(lambda: load_omics(path))

            def naive() -> None:
                full = pd.read_csv(path, sep="\t", index_col=0)
                full = full if orientation == "patients x genes" else full.T
                full.loc[:, wanted].to_numpy(dtype=np.float64)

            base = _best_of(naive)
            size = path.stat().st_size / 1e6
            print(
                f"{orientation:17s} ({size:5.1f} MB): load_omics {ours:6.2f} s | full pandas read "
                f"{base:6.2f} s | speed-up x{base / ours:4.1f}"
            )


if __name__ == "__main__":
    main()
