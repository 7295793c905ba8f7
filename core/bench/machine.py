"""Machine facts and the timing primitives every section uses: cores, load, CPU flags, thread counts, interleaved
rounds (:func:`race`)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from typing import Callable, Dict, List, Optional, Tuple


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def _load() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Windows
        return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    from ..device import cpu_supports_bf16

    flags = _cpu_flags().split()
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        mem_gb = None
    return {
        "cpu": _cpu_name(),
        "cores": _cores(),
        "memory_gb": round(mem_gb, 1) if mem_gb else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16": bool(cpu_supports_bf16()),
        "cpu_flags_bf16": [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags],
        "cuda": bool(torch.cuda.is_available()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _thread_counts(default: int) -> List[int]:
    counts = {1, default}
    n = 2
    while n < default:
        counts.add(n)
        n *= 2
    return sorted(counts)


class _Threads:
    """``with _Threads(n):`` torch uses n threads inside, the previous count after."""

    def __init__(self, n: int) -> None:
        self.n = int(n)

    def __enter__(self):
        import torch

        self.prev = torch.get_num_threads()
        if self.n > 0:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.prev)


def race(variants: Dict[str, Callable[[], object]], rounds: int, warmup: bool = True,
         log: Callable[[str], None] = print) -> Tuple[Dict[str, dict], Dict[str, object]]:
    """Time each variant ``rounds`` times, interleaved (A B C A B C ...) so that a change of machine load hits all
    alike; best (min) and all times. Returns ``({name: {"seconds", "all"}}, {name: last output})``."""
    times: Dict[str, List[float]] = {k: [] for k in variants}
    outputs: Dict[str, object] = {}
    if warmup:
        for name, fn in variants.items():
            outputs[name] = fn()
    for r in range(max(1, rounds)):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t0)
        log(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    return {k: {"seconds": min(v), "all": [round(t, 3) for t in v]} for k, v in times.items()}, outputs
