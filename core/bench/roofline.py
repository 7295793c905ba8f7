"""Roofline: ``torch.mm`` GFLOP/s per thread count, what the encoders' GFLOP/s are compared with."""

from __future__ import annotations

import time
from typing import Dict, Optional, Sequence

from .machine import _Threads


def matmul_gflops(n: int, dtype, repeats: int) -> float:
    """Best-of-``repeats`` GFLOP/s of ``torch.mm`` on two n x n matrices (2 n^3 FLOPs), after one warm-up."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def bench_roofline(threads: Sequence[int], bf16: bool, quick: bool, log) -> dict:
    import torch

    n, repeats = (1024, 3) if quick else (4096, 5)
    out: Dict[str, object] = {"n": n, "repeats": repeats, "fp32": {}, "bf16": {} if bf16 else None}
    for t in threads:
        with _Threads(t):
            out["fp32"][str(t)] = round(matmul_gflops(n, torch.float32, repeats), 1)
            if bf16:
                out["bf16"][str(t)] = round(matmul_gflops(n, torch.bfloat16, repeats), 1)
        log(f"  roofline {t} thread(s): fp32 {out['fp32'][str(t)]} GFLOP/s"
            + (f", bf16 {out['bf16'][str(t)]} GFLOP/s" if bf16 else ""))
    return out


def _roof(roofline: Optional[dict], dtype: str, threads: int) -> Optional[float]:
    if not roofline or not roofline.get(dtype):
        return None
    return roofline[dtype].get(str(threads))
