"""An alpha-beta model of one data-parallel step and of the clip step, fitted here and extrapolated to pods.

    .venv/bin/python benchmarks/cost_model.py [docs/scaling.json]

Reads the timings `benchmarks/scaling.py` wrote, fits this machine's constants, says how far the fitted model
is from each measurement, and prints the predicted overhead of clipping for 8 to 4,096 replicas on 8-GPU
H100 nodes and on a TPU v5p slice, for models of 100M to 10B parameters. docs/scaling.md explains the model,
its assumptions and the source of every constant; its tables are this script's output.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
from typing import Dict, List, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GRAD_BYTES = 4  # float32 gradients (distclip accumulates the norm in float32 whatever their dtype)
#: Bytes per parameter the clip step moves through memory when the threshold binds: the norm pass reads
#: the gradients (4), the one multiply reads and writes them (8).
CLIP_BYTES = 3 * GRAD_BYTES


# ---------------------------------------------------------------------------------------------- this machine
def _nonnegative_fit(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (few coefficients: the best over the subsets left free)."""
    best, best_err = np.zeros(a.shape[1]), float(np.sum(y ** 2))
    for mask in range(1, 2 ** a.shape[1]):
        cols = [i for i in range(a.shape[1]) if mask >> i & 1]
        coef, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
        if (coef >= 0).all():
            full = np.zeros(a.shape[1])
            full[cols] = coef
            err = float(np.sum((a @ full - y) ** 2))
            if err < best_err:
                best, best_err = full, err
    return best


def fit_this_machine(results: List[dict]) -> Dict[str, float]:
    """Constants for the logical-CPU runs of scaling.py, where the n replicas share 2 cores and one memory system.

    unclipped step  t_u = c n + f P + g (n - 1) P     per-replica fixed cost, the global batch's compute,
                                                      the in-process ring (2 (n-1)/n * 4 bytes per parameter
                                                      on each of n replicas)
    clip overhead   d   = a n + k CLIP_BYTES n P      per-replica fixed cost; each of the n replicas does its own
                                                      norm pass and multiply, on the same shared cores and
                                                      memory; k: seconds per byte

    Fitted to relative error (each row divided by its measured time), every coefficient >= 0.
    """
    n = np.array([r["replicas"] for r in results], float)
    p = np.array([r["params"] for r in results], float)
    t_u = np.array([statistics.median(r["unclipped_s"]) for r in results])
    t_c = np.array([statistics.median(r["clipstep_s"]) for r in results])
    c, f, g = _nonnegative_fit(np.stack([n, p, (n - 1) * p], 1) / t_u[:, None], np.ones_like(t_u))
    a, k = _nonnegative_fit(np.stack([n, _clip_bytes(n, p)], 1) / t_u[:, None], (t_c - t_u) / t_u)
    return {"c": c, "f": f, "g": g, "a": a, "k": k,
            "ring_bytes_per_s": 8.0 / g if g > 0 else math.inf,
            "clip_bytes_per_s": 1.0 / k if k > 0 else math.inf}


def _clip_bytes(n, p):
    """Bytes the clip step moves on one host of n logical replicas: each replica's own norm pass and multiply."""
    return CLIP_BYTES * n * p


def check_this_machine(results: List[dict], fit: Dict[str, float]) -> List[Tuple[int, str, float, float, float]]:
    """(replicas, size, measured ratio, modelled ratio, modelled - measured) for every configuration."""
    rows = []
    for r in results:
        n, p = r["replicas"], r["params"]
        t_u = fit["c"] * n + fit["f"] * p + fit["g"] * (n - 1) * p
        d = fit["a"] * n + fit["k"] * _clip_bytes(n, p)
        measured = statistics.median(r["ratios"])
        modelled = (t_u + d) / t_u
        rows.append((n, r["size"], measured, modelled, modelled - measured))
    return rows


# ---------------------------------------------------------------------------------------------- pods
#: Published figures (sources in docs/scaling.md) and the assumptions marked there.
H100_NODE = dict(
    peak_flops=989e12,       # H100 SXM, dense BF16 (NVIDIA H100 datasheet)
    hbm_bytes_per_s=3.35e12,  # H100 SXM HBM3 (datasheet)
    nvlink_bytes_per_s=450e9,  # NVLink 4: 900 GB/s per GPU, both directions together (datasheet)
    nic_bytes_per_s=50e9,    # 400 Gb/s between nodes, one NIC per GPU (as in DGX H100: 8x ConnectX-7 400 Gb/s)
    alpha_nvlink=3e-6,       # assumed latency per step of a ring inside a node
    alpha_net=8e-6,          # assumed latency per step between nodes (InfiniBand/RoCE, through NCCL)
    gpus_per_node=8,
)
TPU_V5P = dict(
    peak_flops=459e12,       # TPU v5p, BF16 (Google Cloud TPU v5p documentation)
    hbm_bytes_per_s=2.765e12,  # TPU v5p HBM2e (same)
    ici_bytes_per_s=600e9,   # 4,800 Gb/s ICI per chip (same), all links and both directions together
    alpha_ici=2e-6,          # assumed latency per hop
)
MFU = 0.4                    # assumed fraction of peak the model's compute reaches
TOKENS_PER_REPLICA = 8192    # assumed tokens per replica per step (e.g. 4 sequences of 2,048)
KERNEL_S = 10e-6             # assumed fixed cost of the clip step's few extra kernels (norm, compare, multiply)


def compute_s(params: float, peak: float) -> float:
    return 6 * params * TOKENS_PER_REPLICA / (MFU * peak)


def clip_s(params: float, hbm: float, shards: int = 1) -> float:
    """The clip step on one replica: the norm pass and the multiply over its (share of the) gradients."""
    return KERNEL_S + CLIP_BYTES * params / shards / hbm


def gpu_allreduce_s(params: float, n: int, tree: bool) -> float:
    """Hierarchical all-reduce (NCCL's pattern): ring inside each 8-GPU node over NVLink, ring or tree between
    nodes over each GPU's own NIC on 1/8 of the gradients, then the all-gather back."""
    c = H100_NODE
    g = min(n, c["gpus_per_node"])
    nodes = max(1, n // c["gpus_per_node"])
    size = GRAD_BYTES * params
    intra = 2 * (g - 1) / g * size / c["nvlink_bytes_per_s"] + 2 * (g - 1) * c["alpha_nvlink"]
    if nodes == 1:
        return intra
    shard = size / g
    hops = 2 * math.log2(nodes) if tree else 2 * (nodes - 1)
    inter = 2 * (nodes - 1) / nodes * shard / c["nic_bytes_per_s"] + hops * c["alpha_net"]
    return intra + inter


def tpu_allreduce_s(params: float, n: int) -> float:
    """All-reduce on a 3D torus of n chips (k x k x k): bidirectional rings along each dimension."""
    c = TPU_V5P
    k = round(n ** (1 / 3))
    size = GRAD_BYTES * params
    return 2 * (n - 1) / n * size / (c["ici_bytes_per_s"] / 2) + 2 * 3 * (k - 1) * c["alpha_ici"]


def pod_table(kind: str) -> List[Tuple[int, float, float, float, float]]:
    """(replicas, params, step s, clip s, overhead) with communication hidden behind the backward pass (the
    worst case for clipping's share), for the sizes and replica counts docs/scaling.md shows."""
    rows = []
    for params in (1e8, 1e9, 1e10):
        for n in (8, 64, 512, 4096):
            if kind == "gpu":
                comp, clip = compute_s(params, H100_NODE["peak_flops"]), clip_s(params, H100_NODE["hbm_bytes_per_s"])
                comm = gpu_allreduce_s(params, n, tree=n >= 512)
            else:
                comp, clip = compute_s(params, TPU_V5P["peak_flops"]), clip_s(params, TPU_V5P["hbm_bytes_per_s"])
                comm = tpu_allreduce_s(params, n)
            step = max(comp, comm)  # communication overlapped with the backward pass
            rows.append((n, params, step, clip, clip / step, comm))
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else os.path.join(os.path.dirname(HERE), "docs", "scaling.json")
    with open(path) as f:
        results = [r for r in json.load(f)["results"] if r.get("backend", "mirrored") == "mirrored"]
    fit = fit_this_machine(results)
    largest = max(r["replicas"] for r in results)
    held_out = fit_this_machine([r for r in results if r["replicas"] < largest])
    print("## This machine: fitted constants")
    print(f"- unclipped step: {fit['c'] * 1e3:.2f} ms per replica + {fit['f'] * 1e9:.2f} ns per parameter (the "
          f"global batch's compute) + the in-process ring at {fit['ring_bytes_per_s'] / 1e9:.2f} GB/s")
    print(f"- clip step: {fit['a'] * 1e3:.3f} ms per replica + {CLIP_BYTES} n bytes per parameter at "
          f"{fit['clip_bytes_per_s'] / 1e9:.2f} GB/s")
    print("\n## This machine: model against measurement (ratio ClipStep / unclipped, medians)")
    print(f"Fitted to every run, and (last column) to the runs with fewer than {largest} replicas only, so that "
          f"its {largest}-replica rows are predictions.\n")
    print(f"| replicas | size | measured | modelled | modelled - measured | fitted without {largest} replicas |\n"
          "|---|---|---|---|---|---|")
    for (n, size, measured, modelled, err), (_, _, _, predicted, _) in zip(check_this_machine(results, fit),
                                                                          check_this_machine(results, held_out)):
        print(f"| {n} | {size} | {measured:.3f} | {modelled:.3f} | {err:+.3f} | {predicted:.3f} ({predicted - measured:+.3f}) |")
    for kind, title in (("gpu", "8-GPU H100 nodes, NVLink inside, 400 Gb/s per GPU between nodes"),
                        ("tpu", "TPU v5p slice (3D torus, ICI)")):
        print(f"\n## Predicted: {title}")
        print("| params | replicas | compute ms | all-reduce ms | clip step ms | clip / step |\n|---|---|---|---|---|---|")
        for n, params, step, clip, share, comm in pod_table(kind):
            comp = compute_s(params, (H100_NODE if kind == "gpu" else TPU_V5P)["peak_flops"])
            print(f"| {params / 1e9:g}B | {n} | {comp * 1e3:.1f} | {comm * 1e3:.1f} | {clip * 1e3:.2f} | {share:.2%} |")
    zero = 2 * math.log2(4096) * H100_NODE["alpha_net"]
    print(f"\nSharded optimizer (each replica clips its 1/n of the reduced gradients): the norm needs one scalar "
          f"all-reduce more, {zero * 1e6:.0f} us at 4,096 GPUs (tree, 2 log2 n latencies), and the norm pass and "
          f"multiply shrink n-fold.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
