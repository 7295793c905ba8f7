"""``python -m core bench``: its options and the run that calls every section and writes bench.json / bench.md."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Dict

from ..paths import PACKAGE_ROOT, RESOURCES
from .e2e import E2E_VARIANTS, _threads_kind, make_random_adapters, run_e2e, run_params
from .encoder import bench_encoders
from .inputs import _pixels, mosaic_vrt, real_tile
from .machine import _load, _now, _thread_counts, machine_info
from .memory import bench_memory, memory_child
from .report import _notes, best_threads, render_markdown, speed_steps
from .roofline import bench_roofline

SECTIONS = ("roofline", "encoder", "e2e", "latency", "multi", "memory", "cluster")
SHARED_DATA = PACKAGE_ROOT.parent / "shared" / "data"
DEFAULT_TARGET = SHARED_DATA / "oam_mosaics" / "zanzibar.tif"
DEFAULT_REFERENCE = RESOURCES / "demo" / "reference.tif"
DEFAULT_REFERENCE_GEOMETRY = RESOURCES / "demo" / "reference_houses.geojson"
SCHEMA = 1


def add_arguments(p) -> None:
    p.add_argument("--out", default="out/bench", help="folder for bench.json and bench.md (default out/bench)")
    p.add_argument("--quick", action="store_true", help="small inputs, one round: every section in ~1-2 minutes")
    p.add_argument("--sections", default="all", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--target", default=str(DEFAULT_TARGET), help="large target raster for e2e and the tile")
    p.add_argument("--truth", help="ground-truth mask raster on the target's grid (default: <target>_buildings.tif)")
    p.add_argument("--reference", default=str(DEFAULT_REFERENCE))
    p.add_argument("--reference-geometry", default=str(DEFAULT_REFERENCE_GEOMETRY))
    p.add_argument("--adapters", default="none",
                   help="as for segment: 'default', 'none' or a .pt path (default none: the e2e variants time the "
                        "training-free mode; the virefsam variant times the adapters' passes)")
    p.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime threads (0: their defaults)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the e2e rows run (default cpu; make gpu-check runs them on cuda)")
    p.add_argument("--rounds", type=int, default=0, help="interleaved timing rounds (0: 3, quick 1)")
    p.add_argument("--no-vit-b", action="store_true", help="skip the vit_b encoder (30-60 s a pass on 2 cores)")
    p.add_argument("--e2e-variants",
                   default="auto,baseline,default,blend,default_fp32,twoclass,before8,whole,exact,torch,onnxruntime_tbest,bf16_tbest,virefsam,vcponly",
                   help="the default run as analysts start it (auto: the shipped adapters weighed by the check on "
                        "the reference), the first shipped file alone (default), the pipeline as is in the "
                        "training-free mode (baseline: encoder backend auto, ONNX Runtime for the embedded model on the "
                        "CPU), two classes in one run (twoclass: the baseline's run with a second class), with the PyTorch encoder (torch) or the ORT encoder (onnxruntime) chosen through the "
                        "engine's encoder_backend, as before #8 (before8: PyTorch encoder and SAM's MaskDecoder "
                        "module), in virefsam mode with random-init adapters (virefsam, timing only), with "
                        "precision bf16 (bf16, where the CPU has it); '_t<n>' appended: with n torch/ORT threads, "
                        "'_tbest': the fastest thread count of the encoder section")
    p.add_argument("--e2e-size", type=int, default=0, help="e2e on a centred N x N crop of the target (0: all)")
    p.add_argument("--e2e-rounds", type=int, default=1,
                   help="e2e variants run in this many interleaved rounds, the fastest kept (for loaded machines)")
    p.add_argument("--memory-sizes", default="", help="target sizes in pixels (default 2048,4096,16384)")
    p.add_argument("--max-tiles", type=int, default=None,
                   help="bench only: at most this many tiles per run go through the model in the memory runs "
                        "(default 2, quick 0); the other tiles reuse their probabilities (zeros with 0)")
    p.add_argument("--memory-gdal-cachemax", default="64",
                   help="the largest memory size once more with this GDAL_CACHEMAX (MB; '' for none)")
    p.add_argument("--render-only", action="store_true", help="write bench.md again from the bench.json in --out")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)


def run(args) -> int:
    if args.memory_child is not None:
        return memory_child(args)
    if args.render_only:
        path = Path(args.out) / "bench.json"
        report = json.loads(path.read_text())
        report["notes"] = _notes(report)
        path.write_text(json.dumps(report, indent=2))
        (Path(args.out) / "bench.md").write_text(render_markdown(report))
        return 0
    import torch

    from ..errors import InputError

    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_", dir=str(out_dir)))
    sections = SECTIONS if args.sections in ("", "all") else tuple(s.strip() for s in args.sections.split(","))
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise InputError(f"Unknown bench section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}.")
    for p in (args.target, args.reference, args.reference_geometry):
        if not Path(p).is_file():
            raise InputError(f"The bench input {p} does not exist.")
    if args.truth is None:
        guess = Path(args.target).with_name(Path(args.target).stem + "_buildings.tif")
        args.truth = str(guess) if guess.is_file() else None
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    info = machine_info()
    info["load_before"] = _load()
    report: Dict[str, object] = {"schema": SCHEMA, "quick": bool(args.quick), "started": _now(),
                                 "sections": list(sections), "machine": info,
                                 "args": {k: v for k, v in vars(args).items() if not k.startswith("_")
                                          and k not in ("memory_child", "child_out")}}
    threads = info["torch_threads"]
    try:
        if "roofline" in sections:
            log("roofline ...")
            report["roofline"] = bench_roofline(_thread_counts(threads), info["bf16"], args.quick, log)
        else:
            report["roofline"] = None

        # the target: the real large raster, or a 1024^2 crop of it in quick mode
        target = args.target
        e2e_size = 1024 if args.quick else args.e2e_size
        if e2e_size:  # a centred crop of the target (VRT)
            target = mosaic_vrt(args.target, e2e_size, str(work / f"e2e_target_{e2e_size}.vrt"),
                                offset=tuple(max(0, (s - e2e_size) // 2) for s in _pixels(args.target)))
        if "encoder" in sections:
            log("encoder ...")
            tile, truth = real_tile(args.target, args.truth)
            report["encoder"] = bench_encoders(args, info, report["roofline"], tile, truth, log)
            report["speed_steps"] = speed_steps(report)
            report["best_threads"] = args.best_threads = best_threads(report)
        if "e2e" in sections:
            log("end to end ...")
            variants = [v.strip() for v in args.e2e_variants.split(",") if v.strip()]
            if args.quick:  # the headline pair: the default (auto) run and the training-free baseline
                variants = variants[:2]
            from .. import pipeline
            from ..modeling import ort_encoder

            t0 = time.perf_counter()
            pipeline.load_engine(run_params(args, [args.target], None).model)
            report["model_load_seconds"] = round(time.perf_counter() - t0, 2)
            have = {"onnxruntime": ort_encoder.available(), "bf16": info["bf16"]}
            variants = [v for v in variants  # rows that need what this machine lacks are left out
                        if have.get(getattr(E2E_VARIANTS.get(v.partition("_t")[0]), "needs", None), True)]
            resolved = []  # '_tbest' -> the count found by the encoder section; the default count -> no suffix
            for v in variants:
                base, _, t = v.partition("_t")
                if t == "best":
                    t = str((getattr(args, "best_threads", None) or {}).get(_threads_kind(base), threads))
                name = base if t in ("", str(threads)) else f"{base}_t{t}"
                if name not in resolved:
                    resolved.append(name)
            variants = resolved
            wanted = {getattr(E2E_VARIANTS.get(v.partition("_t")[0]), "adapters", None) for v in variants}
            if "dta" in wanted:  # random-init adapters for the virefsam rows (timing only)
                args.random_adapters = str(make_random_adapters(args, work / "random_adapters.pt"))
            if "vcp" in wanted:
                args.random_adapters_vcp = str(make_random_adapters(args, work / "random_adapters_vcp.pt", dta=False))
            best: Dict[str, dict] = {}
            writes = pipeline.vector_writing_available()  # without GDAL's bindings: no GeoPackage, no write time
            report["e2e_writes"] = writes
            for _ in range(max(1, args.e2e_rounds)):  # interleaved rounds: a load change hits every variant
                for v in variants:
                    res = run_e2e(args, [target], str(work / f"e2e_{v}.gpkg") if writes else None, variant=v,
                                  log=log)
                    if v in best:
                        res["rounds_seconds"] = best[v]["rounds_seconds"] + [res["seconds"]]
                        if res["seconds"] >= best[v]["seconds"]:
                            best[v]["rounds_seconds"] = res["rounds_seconds"]
                            continue
                    else:
                        res["rounds_seconds"] = [res["seconds"]]
                    best[v] = res
            report["e2e"] = [best[v] for v in variants]
        if "multi" in sections:
            log("several targets ...")
            size = 512 if args.quick else 1024
            w, h = _pixels(args.target)
            offs = [(0, 0), (max(0, w - size), 0), (0, max(0, h - size))]
            tgts = [mosaic_vrt(args.target, size, str(work / f"multi_{i}.vrt"), offset=o) for i, o in enumerate(offs)]
            report["multi"] = run_e2e(args, tgts, str(work / "multi.gpkg"), label="3 targets", log=log)
        if "memory" in sections:
            log("memory ...")
            sizes = [int(s) for s in args.memory_sizes.split(",") if s.strip()] if args.memory_sizes else (
                [512, 1024] if args.quick else [2048, 4096, 16384])
            max_tiles = args.max_tiles if args.max_tiles is not None else (0 if args.quick else 2)
            report["memory"] = bench_memory(args, sizes, max_tiles, work, log,
                                            gdal_cachemax=None if args.quick else args.memory_gdal_cachemax)
        if "latency" in sections:
            log("model load and first-tile latency (a fresh process) ...")
            from .default import load_latency

            report["latency"] = load_latency(args.threads, args.target)
        if "cluster" in sections:
            log("in-process vs a local Dask cluster ...")
            from .cluster import bench_rows

            target = args.target
            if args.quick:
                w, h = _pixels(args.target)
                target = mosaic_vrt(args.target, 1024, str(work / "cluster.vrt"), offset=(max(0, w - 1024), 0))
            report["cluster"] = bench_rows(target, "local:2", None if args.adapters == "none" else args.adapters,
                                           args.threads, log=log)
    finally:
        for f in sorted(work.glob("*"), reverse=True):
            try:
                f.unlink()
            except OSError:
                pass
        try:
            work.rmdir()
        except OSError:
            pass
    info["load_after"] = _load()
    loads = [x for x in (info["load_before"] or [])[:1] + (info["load_after"] or [])[:1]]
    info["loaded"] = bool(loads) and max(loads) > 0.5 * info["cores"]
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["notes"] = _notes(report)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    (out_dir / "bench.md").write_text(render_markdown(report))
    log(f"wrote {out_dir / 'bench.md'} and {out_dir / 'bench.json'} in {report['seconds']:.0f} s")
    return 0
