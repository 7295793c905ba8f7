"""The tile loop on a Dask cluster (``RunParams.cluster``): ``local:N`` or ``tcp://HOST:PORT``.

``dask.distributed`` does the scheduling, the transport, and the recovery of a lost worker's tiles (the scheduler
gives them to another worker); this module only decides what travels:

* before any work (:meth:`ClusterExecutor.connect`): the scheduler is reached (:data:`CONNECT_TIMEOUT_S`), at
  least one worker is there, and every worker runs the same packages (torch, numpy, onnxruntime, dask, ...) and
  the same ``core`` code as this computer; otherwise one sentence (InputError);
* once per run (:meth:`ClusterExecutor.start`): the reference as the client's predictor prepared it
  (:meth:`ReferencePredictor.reference_state`: prototypes or static prompts, a few KB) and the run's parameters
  (JSON), scattered to every worker (``broadcast=True``), not sent per tile;
* per tile: a task of a few hundred bytes (the target's path as given, which the worker opens itself, and the
  tile's window); back: the tile's probability map as the predictor computed it (float32, 4 bytes per tile
  pixel: 4 MiB for a 1024 x 1024 tile) and its valid mask, packed, when not all valid. Each worker process builds
  its engine and predictor once and keeps them (:mod:`.cluster_worker`).

The client stitches and vectorises exactly as in-process, so the output is the same polygons (tiles are blended
in the order they complete, which changes sums in the last bit only). Not uint8: rounding the probabilities to
1/255 (or even 1/65535) moved blended pixels across the threshold in the overlaps of the real Kampala
orthophoto, and hole filling and the merging of fragments amplified it (union IoU 0.988 and 158 instead of 160
polygons with uint8; IoU 0.9996 and 158 with uint16), while the probabilities hardly compress (zlib: 12 %
smaller), so the exact values travel.

The worker imports this package as ``core`` (the project root on its ``PYTHONPATH``); the client may be the
QGIS plugin, where it is ``virefsam.core``: tasks therefore go through a small function sent by value
(:func:`_remote`), and everything that travels is plain data.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .errors import CancelledError, InputError, ModelError
from .params import check_address  # noqa: F401  (the cluster address rule lives with RunParams)

CONNECT_TIMEOUT_S = 5
LAST_STATS: Dict[str, object] = {}  # the last closed ClusterExecutor's stats (for core.bench.cluster)
WORKERS_TIMEOUT_S = 20
ROOT = str(Path(__file__).resolve().parent.parent)
_REMOTE_SRC = '''
def virefsam_remote(name, root, *args):
    """Runs core.cluster_worker.<name>(*args) on a Dask worker (sent by value: see core.cluster)."""
    import importlib
    import sys
    try:
        module = importlib.import_module("core.cluster_worker")
    except ImportError:
        if not root or root in sys.path:
            raise
        sys.path.insert(0, root)  # a LocalCluster on the client's computer: the project is there
        module = importlib.import_module("core.cluster_worker")
    return getattr(module, name)(*args)
'''


def _remote():
    """A function whose module does not exist anywhere, so cloudpickle sends it by value."""
    namespace = {"__name__": "virefsam_remote_task"}
    exec(compile(_REMOTE_SRC, "<virefsam_remote>", "exec"), namespace)  # noqa: S102 - our own constant source
    return namespace["virefsam_remote"]


def _local_versions() -> dict:
    from . import cluster_worker

    return {"packages": cluster_worker.package_versions(), "core": cluster_worker.code_fingerprint()}


class ClusterExecutor:
    """The tile loop on a Dask cluster (see the module docstring). ``stats`` after a run: tiles, tasks, bytes sent
    per task, bytes received per tile, seconds on the workers."""

    def __init__(self, client, cluster=None, address: str = "", params=None) -> None:
        self.client, self.cluster, self.address, self.params = client, cluster, address, params
        self.reference = None
        self.token = ""
        self.remote = _remote()
        import cloudpickle

        self._remote_bytes = len(cloudpickle.dumps(self.remote))  # sent with every task (by value)
        self.notes: List[str] = []
        self.stats = {"tiles": 0, "tasks": 0, "bytes_sent": 0, "bytes_received": 0, "worker_seconds": 0.0,
                      "worker_setup_seconds": 0.0, "reference_bytes": 0, "loop_seconds": 0.0, "workers": 0}
        self.name = f"the Dask cluster at {address}"

    # -- connection -------------------------------------------------------------------------------------------
    @classmethod
    def connect(cls, params, progress: Optional[Callable[[float, str], None]] = None) -> "ClusterExecutor":
        address = params.cluster
        check_address(address)
        say = progress or (lambda f, m="": None)
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise InputError("Running on a Dask cluster needs the dask and distributed packages: install the "
                             "project's requirements.txt.") from None
        cluster = None
        if address.startswith("local"):
            import sys

            if not os.path.basename(sys.executable).lower().startswith("python"):
                # multiprocessing would start sys.executable (QGIS itself) as the workers
                raise InputError(f"{address} starts worker processes from a Python command line only: inside this "
                                 "application give a running scheduler's address (tcp://HOST:8786).")
            n = int(address.split(":", 1)[1]) if ":" in address else 2
            say(0.0, f"starting {n} Dask workers on this computer")
            try:
                cores = len(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover
                cores = os.cpu_count() or 1
            threads = params.model.threads or max(1, cores // n)
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address=None, silence_logs=logging.ERROR,
                                   env={"VIREFSAM_WORKER_THREADS": str(threads)})
            target = cluster
        else:
            say(0.0, f"connecting to the Dask scheduler at {address}")
            target = address
        try:
            client = Client(target, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            if cluster is not None:
                cluster.close()
            raise InputError(f"The Dask scheduler at {address} cannot be reached within {CONNECT_TIMEOUT_S} s "
                             f"({type(exc).__name__}): start it (dask scheduler) or correct the address.") from None
        self = cls(client, cluster, address, params)
        try:
            self._check()
        except BaseException:
            self.close()
            raise
        return self

    def _check(self) -> None:
        """At least one worker, and the same packages and code everywhere (one sentence otherwise)."""
        try:
            self.client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
        except (TimeoutError, OSError):
            raise InputError(f"The Dask scheduler at {self.address} has no worker after {WORKERS_TIMEOUT_S} s: start "
                             f"at least one (dask worker {self.address}).") from None
        mine = _local_versions()
        sched = self.client.get_versions(packages=[])["scheduler"]["packages"]
        for name in ("dask", "distributed"):
            if sched.get(name) != mine["packages"][name]:
                raise InputError(f"The Dask scheduler at {self.address} runs {name} {sched.get(name)} and this "
                                 f"computer {mine['packages'][name]}: run the same pinned environment "
                                 "(requirements.txt) everywhere.")
        theirs = self.client.run(self.remote, "versions", ROOT)
        for addr, v in sorted(theirs.items()):
            for name, version in mine["packages"].items():
                if v["packages"].get(name) != version:
                    raise InputError(f"The Dask worker {addr} runs {name} {v['packages'].get(name)} and this "
                                     f"computer {version}: install the same pinned environment "
                                     "(requirements.txt) on every worker.")
            if v["core"] != mine["core"]:
                raise InputError(f"The Dask worker {addr} runs another version of ViRefSAM's core ({v['core']}) "
                                 f"than this computer ({mine['core']}): give every worker the same copy of the "
                                 "plugin.")

    # -- the run ----------------------------------------------------------------------------------------------
    def start(self, predict=None, predictor=None, stage=None) -> None:
        """Scatter the predictor's reference state to every worker, once."""
        shared = {"state": predictor.reference_state(), "params": self.params.to_json()}
        self.token = uuid.uuid4().hex
        self.stats["reference_bytes"] = len(pickle.dumps(shared, protocol=5))
        [self.reference] = self.client.scatter([shared], broadcast=True, hash=False)
        self.stage = stage
        n = len(self.client.scheduler_info(n_workers=-1).get("workers", {}))
        self.notes.append(f"The tiles were segmented on the Dask cluster at {self.address} ({n} workers).")

    def tiles(self, src, grid, is_cancelled: Optional[Callable[[], bool]] = None):
        """Submit every tile of ``src`` (one task per tile), yield ``(tile, prob, valid)`` as tasks complete."""
        from distributed import as_completed
        from . import cluster_worker

        cancelled = is_cancelled or (lambda: False)
        futures = []
        for tile in grid:
            w = tile.window
            job = {"token": self.token, "path": src.path, "bands": self.params.bands,
                   "tiles": [(tile.index, int(w.col_off), int(w.row_off), int(w.width), int(w.height),
                              int(tile.out_shape[0]), int(tile.out_shape[1]))]}
            self.stats["bytes_sent"] += len(pickle.dumps(job, protocol=5)) + self._remote_bytes
            futures.append(self.client.submit(self.remote, "predict_tiles", ROOT, job, self.reference, pure=False,
                                              key=f"virefsam-tile-{tile.index}-{self.token[:8]}-{uuid.uuid4().hex[:8]}"))
        self.stats["tasks"] += len(futures)
        self.stats["workers"] = len(self.client.scheduler_info(n_workers=-1).get("workers", {}))
        t0 = time.perf_counter()
        pending = as_completed(futures, loop=self.client.loop)
        try:
            while not pending.is_empty():
                if cancelled():
                    raise CancelledError()
                batch = pending.next_batch(block=False)
                if not batch:
                    time.sleep(0.05)
                    continue
                for fut in batch:
                    out = self._result(fut, src.path)
                    for entry in out["tiles"]:
                        index, prob, valid = cluster_worker.unpack(entry)
                        self.stats["tiles"] += 1
                        self.stats["bytes_received"] += 0 if entry[1] is None else entry[1].nbytes
                        self.stats["bytes_received"] += 0 if entry[2] is None else entry[2][0].nbytes
                        yield grid[index], prob, valid
                    fut.release()
        finally:
            self.stats["loop_seconds"] += time.perf_counter() - t0
            self.client.cancel([f for f in futures if not f.done()])

    def _result(self, fut, path: str) -> dict:
        try:
            out = fut.result()
        except Exception as exc:  # noqa: BLE001 - a worker died too often, or a bug on the worker
            name = type(exc).__name__
            if name == "KilledWorker":
                raise InputError(f"The Dask workers kept dying while predicting tiles of {path}: look at the "
                                 "workers' logs (memory?).") from None
            raise
        err = out.get("error")
        if err:
            if err["kind"] == "model":
                raise ModelError(f"The Dask worker {out['worker']} cannot load the model from {err['file']}: "
                                 f"{err['message'].rstrip('.')}.")
            raise InputError(f"The Dask worker {out['worker']} cannot read {err['file']} ({err['message'].rstrip('.')}): "
                             "give paths or URLs every worker can reach.")
        self.stats["worker_seconds"] += float(out.get("seconds", 0.0))
        self.stats["worker_setup_seconds"] += float(out.get("setup_seconds", 0.0))
        return out

    def worker_stats(self) -> Dict[str, dict]:
        """Per worker: engines built and reference states loaded by this process so far."""
        return self.client.run(self.remote, "stats", ROOT)

    def close(self) -> None:
        LAST_STATS.clear()
        LAST_STATS.update(self.stats, address=self.address)
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


__all__ = ["ClusterExecutor", "check_address", "CONNECT_TIMEOUT_S"]
