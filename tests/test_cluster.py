"""The tile loop on a real Dask cluster (core.cluster): real LocalCluster processes, a real `dask scheduler` and
real `dask worker` processes on 127.0.0.1, the real embedded SAM, the real 2048 x 2048 Kampala orthophoto.

Mode: training-free (adapters none) at tile size 1024 (9 tiles on kampala.tif), to keep the time sane on 2 cores;
the cluster path does not depend on the mode (the predictor's reference state travels either way). One slow test
runs the trained mode with K > 1 reference crops: the K-shot ensemble's per-shot prototypes travel too.
The equality runs are marked ``slow`` (opt-in: ``pytest -m slow tests/test_cluster.py``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from osgeo import ogr
from shapely import wkb
from shapely.ops import unary_union

from core.bench import reference_spec
from core.errors import CancelledError, InputError, ModelError
from core.params import ModelParams, RunParams
from core.pipeline import run

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "resources" / "demo"
DASK = str(Path(sys.executable).with_name("dask"))


def _params(out, targets, cluster="", tile_size=1024, overlap=128, **model):
    ref = reference_spec(str(DEMO / "reference.tif"), str(DEMO / "reference_houses.geojson"))
    mode = "virefsam" if model.get("adapters") else "training_free"
    return RunParams(class_name="building", references=(ref,), targets=tuple(str(t) for t in targets),
                     output=str(out), overwrite=True, model=ModelParams(device="cpu", **{"adapters": None, **model}),
                     mode=mode, tile_size=tile_size, overlap=overlap, cluster=cluster)


def _polygons(path):
    ds = ogr.Open(str(path))
    lyr = ds.GetLayer(0)
    return [wkb.loads(bytes(f.GetGeometryRef().ExportToWkb())) for f in lyr]


def _same_result(a, b):
    pa, pb = _polygons(a), _polygons(b)
    ua, ub = unary_union(pa), unary_union(pb)
    iou = ua.intersection(ub).area / max(ua.union(ub).area, 1e-9)
    assert iou >= 0.99, iou
    assert abs(len(pa) - len(pb)) <= 0.01 * max(len(pa), len(pb)), (len(pa), len(pb))
    print(f"union IoU {iou:.6f}, polygons {len(pa)} vs {len(pb)}")
    return iou, len(pa), len(pb)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd, cwd, env=None):
    return subprocess.Popen(cmd, cwd=str(cwd), env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the nanny and its worker process: the group we started
        proc.wait(timeout=30)


def _wait_workers(address, n):
    from distributed import Client

    with Client(address, timeout=30, set_as_default=False) as c:
        c.wait_for_workers(n, timeout=120)


class _Cluster:
    """A `dask scheduler` and `dask worker` processes (--nthreads 1, --nworkers 1) on 127.0.0.1 only."""

    def __init__(self, cwd, n_workers=2, pythonpath=ROOT):
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler = _start([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                 "--no-dashboard"], cwd)
        env = {"PYTHONPATH": str(pythonpath), "VIREFSAM_WORKER_THREADS": "1"}
        self.workers = [_start([DASK, "worker", self.address, "--nthreads", "1", "--nworkers", "1", "--host",
                                "127.0.0.1", "--no-dashboard", "--name", f"w{i}"], cwd, env)
                        for i in range(n_workers)]
        _wait_workers(self.address, n_workers)

    def close(self):
        for p in self.workers + [self.scheduler]:
            _stop(p)


@pytest.fixture(scope="module")
def kampala(shared_data):
    return shared_data / "oam_mosaics" / "kampala.tif"  # 2048 x 2048, 9 tiles of 1024


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, kampala):
    out = tmp_path_factory.mktemp("inproc") / "out.gpkg"
    result = run(_params(out, [kampala]))
    assert result.targets[0].n_objects > 10
    return out


@pytest.fixture(scope="module")
def tcp_cluster(tmp_path_factory):
    """Two workers whose working folder is not the client's (relative paths do not reach them)."""
    cluster = _Cluster(tmp_path_factory.mktemp("workers"))
    yield cluster
    cluster.close()


def test_cluster_address_is_checked():
    with pytest.raises(InputError, match="Unknown cluster 'dask:4'"):
        _params("x.gpkg", ["t.tif"], cluster="dask:4")
    p = _params("x.gpkg", ["t.tif"], cluster="tcp://10.0.0.5:8786")
    assert RunParams.from_json(p.to_json()) == p


def test_unreachable_scheduler_is_one_sentence_before_any_work(tmp_path):
    seen = []
    address = f"tcp://127.0.0.1:{_free_port()}"  # nobody listens there
    with pytest.raises(InputError) as err:
        run(_params(tmp_path / "out.gpkg", [DEMO / "target_kampala.tif"], cluster=address),
            progress=lambda f, m: seen.append(m))
    assert str(err.value).startswith(f"The Dask scheduler at {address} cannot be reached")
    assert "loading the model" not in seen and not any(tmp_path.iterdir())


def test_worker_with_other_code_is_refused_before_any_work(tmp_path):
    other = tmp_path / "other_checkout"
    shutil.copytree(ROOT / "core", other / "core", ignore=shutil.ignore_patterns("__pycache__"))
    with open(other / "core" / "cluster_worker.py", "a") as f:
        f.write("\n# a later version of the plugin\n")
    cluster = _Cluster(tmp_path, n_workers=1, pythonpath=other)
    try:
        seen = []
        with pytest.raises(InputError, match=r"The Dask worker tcp://127\.0\.0\.1:\d+ runs another version of "
                                             r"ViRefSAM's core"):
            run(_params(tmp_path / "out.gpkg", [DEMO / "target_kampala.tif"], cluster=cluster.address),
                progress=lambda f, m: seen.append(m))
        assert "loading the model" not in seen and not (tmp_path / "out.gpkg").exists()
    finally:
        cluster.close()


def test_worker_that_cannot_read_a_target_is_named(tmp_path, monkeypatch, tcp_cluster):
    (tmp_path / "target.tif").symlink_to(DEMO / "target_kampala.tif")
    monkeypatch.chdir(tmp_path)  # "target.tif" is readable here, not in the workers' folder
    with pytest.raises(InputError) as err:
        run(_params(tmp_path / "out.gpkg", ["target.tif"], cluster=tcp_cluster.address, tile_size=512, overlap=64))
    msg = str(err.value)
    assert msg.startswith("The Dask worker tcp://127.0.0.1:") and "cannot read target.tif" in msg, msg
    assert msg.count(". ") == 0 and not (tmp_path / "out.gpkg").exists()


def test_worker_that_cannot_load_the_model_is_named(tmp_path, monkeypatch, tcp_cluster):
    (tmp_path / "adapters.pt").symlink_to(ROOT / "resources" / "adapters" / "embedded_virefsam.pt")
    monkeypatch.chdir(tmp_path)  # the adapters exist here, not in the workers' folder
    with pytest.raises(ModelError) as err:
        run(_params(tmp_path / "out.gpkg", [DEMO / "target_kampala.tif"], cluster=tcp_cluster.address,
                    tile_size=512, overlap=64, adapters="adapters.pt"))
    msg = str(err.value)
    assert msg.startswith("The Dask worker tcp://127.0.0.1:") and "cannot load the model from adapters.pt" in msg
    assert not (tmp_path / "out.gpkg").exists()


def test_cancel_on_the_cluster_leaves_no_output(tmp_path, tcp_cluster):
    seen = {}

    def progress(fraction, message):
        if "tile 1/" in message:
            seen["cancel"] = True

    out = tmp_path / "out" / "cancelled.gpkg"
    out.parent.mkdir()
    with pytest.raises(CancelledError):
        run(_params(out, [DEMO / "target_kampala.tif"], cluster=tcp_cluster.address, tile_size=512, overlap=64),
            progress=progress, is_cancelled=lambda: seen.get("cancel", False))
    assert os.listdir(out.parent) == []
    # each worker process built its engine once over the runs of this module, and loaded each run's references
    from distributed import Client

    from core.cluster import ROOT as CORE_ROOT, _remote

    with Client(tcp_cluster.address, timeout=10, set_as_default=False) as c:
        stats = c.run(_remote(), "stats", CORE_ROOT)
    assert all(s["engines_built"] <= 1 for s in stats.values()), stats
    assert sum(s["engines_built"] for s in stats.values()) >= 1, stats


@pytest.mark.slow
def test_local_cluster_gives_the_in_process_result(tmp_path, kampala, in_process):
    out = tmp_path / "cluster.gpkg"
    run(_params(out, [kampala], cluster="local:2"))
    _same_result(in_process, out)


@pytest.mark.slow
def test_local_cluster_runs_the_k_shot_ensemble_as_in_process(tmp_path, shared_data):
    """The trained mode with K > 1 reference crops (the spread-reference demo: houses marked far apart, 3 crops)
    and the K-shot ensemble (the default): the workers get the per-shot prototypes with the joint ones."""
    import dataclasses

    from core.demo import TARGETS, spread_reference

    ref = spread_reference(shared_data / "oam_mosaics" / "zanzibar.tif")
    base = dataclasses.replace(_params(tmp_path / "here.gpkg", [TARGETS["kampala"]], adapters="default"),
                               references=(ref,))
    assert base.mode == "virefsam" and base.kshot == "ensemble"
    here = run(base)
    assert "3 reference crops" in here.scale and here.targets[0].n_objects > 5
    run(dataclasses.replace(base, output=str(tmp_path / "cluster.gpkg"), cluster="local:2"))
    _same_result(tmp_path / "here.gpkg", tmp_path / "cluster.gpkg")
    # the joint decoding alone gives other polygons: the equality above is the ensemble's
    run(dataclasses.replace(base, output=str(tmp_path / "joint.gpkg"), kshot="joint"))
    ua, uj = unary_union(_polygons(tmp_path / "here.gpkg")), unary_union(_polygons(tmp_path / "joint.gpkg"))
    iou = ua.intersection(uj).area / ua.union(uj).area
    print(f"ensemble against joint: union IoU {iou:.4f}")
    assert iou < 0.97, iou


@pytest.mark.slow
def test_local_cluster_uses_the_adapters_the_reference_weighed(tmp_path, shared_data):
    """adapters "auto": the client weighs the files on the reference before the tiles go out; the workers build
    their predictor from the run's params (the files and weights used), so the result is the in-process one.
    This reference (one large marked building) keeps the second file alone, not the one "auto" keeps elsewhere;
    a blend of two files (given weights, as a replay's params give them) goes through the workers too."""
    import dataclasses
    import json

    from shapely.geometry import shape

    from core.engines import default_adapters, objects_adapters
    from core.params import ReferenceSpec

    if objects_adapters("embedded") is None:
        pytest.skip("no second adapters file is shipped")
    tile = shared_data / "oam_buildings" / "images" / "area2_OAM-1238452-1046530-21.tif"
    labels = json.loads((shared_data / "oam_buildings" / "labels_geojson" / f"{tile.stem}.geojson").read_text())
    house = max((shape(f["geometry"]) for f in labels["features"]), key=lambda g: g.area)
    ref = ReferenceSpec(raster=str(tile), foreground=(house.wkt,), crs="EPSG:4326")
    here = RunParams(class_name="building", references=(ref,), targets=(str(tile),), output=str(tmp_path / "here.gpkg"),
                     overwrite=True, model=ModelParams(device="cpu", adapters="auto"), mode="virefsam")
    result = run(here)
    kept = result.params.model  # what the check kept: the files and their weights, written as the run's params
    assert kept.adapters != "auto" and str(objects_adapters("embedded")) in kept.adapters  # an objects file counts
    run(dataclasses.replace(here, output=str(tmp_path / "cluster.gpkg"), cluster="local:2"))
    written = json.loads((tmp_path / "cluster.gpkg.params.json").read_text())
    assert written["model"]["adapters"] == kept.adapters
    assert written["model"]["adapter_weights"] == pytest.approx(list(kept.adapter_weights))
    _same_result(tmp_path / "here.gpkg", tmp_path / "cluster.gpkg")

    blend = dataclasses.replace(here, output=str(tmp_path / "blend.gpkg"), model=ModelParams(
        device="cpu", adapters=f"{default_adapters('embedded')},{objects_adapters('embedded')}",
        adapter_weights=(0.6, 0.4)))
    run(blend)
    run(dataclasses.replace(blend, output=str(tmp_path / "blend_cluster.gpkg"), cluster="local:2"))
    _same_result(tmp_path / "blend.gpkg", tmp_path / "blend_cluster.gpkg")


@pytest.mark.slow
def test_killed_worker_tiles_are_recomputed_and_the_result_is_the_same(tmp_path, kampala, in_process, tcp_cluster):
    killed = []

    def progress(fraction, message):
        if "tile 1/" in message and not killed:  # the first tile is back: both workers are busy with others
            killed.append(tcp_cluster.workers[0])
            _stop(tcp_cluster.workers[0])

    out = tmp_path / "tcp.gpkg"
    run(_params(out, [kampala], cluster=tcp_cluster.address), progress=progress)
    assert killed and killed[0].poll() is not None
    _same_result(in_process, out)


def test_cli_cluster_option_unreachable_is_exit_2_with_one_sentence(tmp_path):
    address = f"tcp://127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "core", "segment", "--reference", str(DEMO / "reference.tif"),
           "--reference-geometry", str(DEMO / "reference_houses.geojson"), "--targets", str(DEMO / "target_kampala.tif"),
           "--out", str(tmp_path / "out.gpkg"), "--adapters", "none", "--device", "cpu", "--quiet",
           "--cluster", address]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert f"The Dask scheduler at {address} cannot be reached" in p.stderr
    assert not any(tmp_path.iterdir())
    bad = subprocess.run(cmd[:-1] + ["dask:4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "Unknown cluster 'dask:4'" in bad.stderr
