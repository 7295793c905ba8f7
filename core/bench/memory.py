"""Memory section: peak memory of ``pipeline.run`` per target size, one subprocess each."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..paths import PACKAGE_ROOT
from .e2e import run_e2e
from .inputs import _pixels, mosaic_vrt


class _RssSampler:
    """Peaks of VmRSS / RssAnon / RssFile+RssShmem from /proc/self/status, sampled every 20 ms in a thread."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak: Dict[str, int] = defaultdict(int)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @classmethod
    def read(cls) -> Dict[str, int]:
        vals = {}
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in cls.FIELDS:
                        vals[k] = int(v.split()[0])  # kB
        except OSError:  # pragma: no cover - not Linux
            pass
        return vals

    def sample(self) -> None:
        vals = self.read()
        for k, v in vals.items():
            self.peak[k] = max(self.peak[k], v)
        self.peak["file+shmem"] = max(self.peak["file+shmem"], vals.get("RssFile", 0) + vals.get("RssShmem", 0))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "_RssSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def memory_child(args) -> int:
    """Inside the subprocess for one size: build the VRT, run the pipeline with the sampler, write JSON."""
    import torch

    size = int(args.memory_child)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    baseline = _RssSampler.read()
    vrt = mosaic_vrt(args.target, size, str(work / f"target_{size}.vrt"))
    with _RssSampler() as sampler:
        e2e = run_e2e(args, [vrt], str(work / f"memory_{size}.gpkg"), max_tiles=args.max_tiles, log=lambda m: None)
    kb = 1024.0
    res = {
        "size": size,
        "target": f"VRT of {Path(args.target).name}" + (" (crop)" if size <= _pixels(args.target)[0] else
                                                         " mosaicked edge to edge"),
        "pixels": size * size,
        "tiles": e2e["tiles"],
        "model_tiles": e2e["model_tiles"],
        "reused_tiles": e2e["reused_tiles"],
        "seconds": e2e["seconds"],
        "features": e2e["features"],
        "split": {k: e2e["pipeline_timings"].get(k) for k in ("read", "predict", "stitch", "vectorize", "write")},
        "start_rss_mb": round(baseline.get("VmRSS", 0) / kb, 1),
        "peak_rss_mb": round(max(sampler.peak.get("VmHWM", 0), sampler.peak.get("VmRSS", 0)) / kb, 1),
        "peak_anon_mb": round(sampler.peak.get("RssAnon", 0) / kb, 1),
        "peak_file_mb": round(sampler.peak.get("file+shmem", 0) / kb, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb, 1),
    }
    Path(args.child_out).write_text(json.dumps(res, indent=2))
    return 0


def bench_memory(args, sizes: Sequence[int], max_tiles: int, work: Path, log,
                 gdal_cachemax: Optional[str] = None) -> List[dict]:
    """One subprocess per size; with ``gdal_cachemax``, the largest size once more with that GDAL block cache."""
    out = []
    runs = [(size, None) for size in sizes] + ([(max(sizes), gdal_cachemax)] if gdal_cachemax else [])
    for size, cachemax in runs:
        child_out = work / f"memory_{size}_{cachemax or 'default'}.json"
        cmd = [sys.executable, "-m", "core", "bench", "--memory-child", str(size), "--max-tiles", str(max_tiles),
               "--out", str(work), "--child-out", str(child_out), "--target", args.target,
               "--reference", args.reference, "--reference-geometry", args.reference_geometry,
               "--adapters", args.adapters, "--threads", str(args.threads)]
        env = dict(os.environ)
        if cachemax:
            env["GDAL_CACHEMAX"] = str(cachemax)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=str(PACKAGE_ROOT), capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"memory run for {size} px failed:\n{proc.stderr[-3000:]}")
        res = json.loads(child_out.read_text())
        res["gdal_cachemax"] = cachemax or os.environ.get("GDAL_CACHEMAX") or "GDAL default (5% of RAM)"
        res["process_seconds"] = round(time.perf_counter() - t0, 1)
        log(f"  memory {size}^2 (GDAL_CACHEMAX {res['gdal_cachemax']}): peak RSS {res['peak_rss_mb']} MB (anon "
            f"{res['peak_anon_mb']}, file-backed {res['peak_file_mb']}), {res['tiles']} tiles ({res['model_tiles']} "
            f"through the model), {res['seconds']:.1f}s")
        out.append(res)
    for f in work.glob("memory_*.gpkg*"):
        f.unlink()
    return out
