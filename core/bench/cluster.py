"""The bench's cluster rows: the same run in this process and on ``local:N`` (:func:`bench_rows`).

    python -m core.bench.cluster [--target zanzibar.tif] [--cluster local:2] [--adapters none]

Each row: wall seconds of the whole run and of its tile loop, tiles, seconds per tile. The cluster row adds what
travels per tile (the task sent, the float32 probability map received; the reference is scattered once: its bytes
once, also spread over the tiles), the workers' one-off setup (model build per worker process) and the
overhead per tile:

    overhead per tile = (tile-loop wall x workers - seconds the workers spent in tiles) / tiles

i.e. the worker time not spent predicting (transport, scheduling, waiting at the end of the loop), to compare
with a tile's time in-process. On a machine with fewer cores than workers the workers share the cores, so the
cluster's seconds per tile are not comparable; its overhead per tile still is.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from ..paths import RESOURCES

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
DEFAULT_TARGET = SHARED_DATA / "oam_mosaics" / "zanzibar.tif"  # 4096 x 4096


def _params(target: str, output: str, cluster: str, adapters: Optional[str], threads: int, tile_size: int):
    from ..params import ModelParams, RunParams
    from .inputs import reference_spec

    demo = RESOURCES / "demo"
    ref = reference_spec(str(demo / "reference.tif"), str(demo / "reference_houses.geojson"))
    return RunParams(class_name="building", references=(ref,), targets=(str(target),), output=output,
                     overwrite=True, model=ModelParams(adapters=adapters, device="cpu", threads=threads),
                     mode="virefsam" if adapters else "training_free", tile_size=tile_size, cluster=cluster)


def bench_rows(target: str = str(DEFAULT_TARGET), cluster: str = "local:2", adapters: Optional[str] = None,
               threads: int = 0, tile_size: int = 1024, log=print) -> List[Dict]:
    """Two rows (in-process, ``cluster``) for the bench table; see the module docstring."""
    from .. import cluster as cluster_module
    from ..pipeline import run

    rows = []
    with tempfile.TemporaryDirectory(prefix="virefsam_cluster_bench_") as tmp:
        for where in ("", cluster):
            out = os.path.join(tmp, f"out_{len(rows)}.gpkg")
            tiles = set()

            def progress(fraction, message, tiles=tiles):
                if ": tile " in message:
                    tiles.add(message)

            params = _params(target, out, where, adapters, threads, tile_size)
            if not where:  # the in-process row starts cold: no plain pass reused from an earlier run here
                from ..engines import load_engine

                engine = load_engine(params.model)
                if getattr(engine, "embeddings", None) is not None:
                    engine.embeddings.clear()
            t0 = time.perf_counter()
            result = run(params, progress=progress)
            wall = time.perf_counter() - t0
            t = result.timings
            row = {"run": where or "in-process", "seconds": round(wall, 1),
                   "objects": sum(x.n_objects for x in result.targets)}
            if not where:
                loop = t.get("read", 0.0) + t.get("predict", 0.0) + t.get("stitch", 0.0)
                n = max(1, len(tiles))
                row.update(tiles=n, loop_seconds=round(loop, 1), seconds_per_tile=round(loop / n, 2))
            else:
                s = dict(cluster_module.LAST_STATS)
                n = max(1, int(s["tiles"]))
                compute = s["worker_seconds"] - s["worker_setup_seconds"]
                overhead = (s["loop_seconds"] * max(1, s["workers"]) - s["worker_seconds"]) / n
                row.update(
                    tiles=n, workers=s["workers"], loop_seconds=round(s["loop_seconds"], 1),
                    seconds_per_tile=round(compute / n, 2),
                    worker_setup_seconds=round(s["worker_setup_seconds"], 1),
                    bytes_sent_per_tile=int(s["bytes_sent"] / n + s["reference_bytes"] / n),
                    task_bytes_per_tile=int(s["bytes_sent"] / n), reference_bytes=int(s["reference_bytes"]),
                    bytes_received_per_tile=int(s["bytes_received"] / n),
                    overhead_per_tile_s=round(overhead, 2),
                )
                local = rows[0]["seconds_per_tile"]
                row["overhead_per_tile_pct"] = round(100.0 * overhead / local, 1) if local else None
            log(json.dumps(row))
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.bench.cluster", description=__doc__.splitlines()[0])
    p.add_argument("--target", default=str(DEFAULT_TARGET))
    p.add_argument("--cluster", default="local:2")
    p.add_argument("--adapters", default="none", help="'none' (training-free, default), 'default' or a .pt path")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tile-size", type=int, default=1024)
    a = p.parse_args(argv)
    bench_rows(a.target, a.cluster, None if a.adapters == "none" else a.adapters, a.threads, a.tile_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
