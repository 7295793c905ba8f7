#!/usr/bin/env python3
"""Which frozen features make good ViRefSAM prototypes? A training-free measurement (results: docs/feature_study.md).

For every 1-shot episode (reference = support image + mask, target = another image with the class), on the
features of one frozen backbone:

* Eq. 1: foreground prototype = masked average pooling of the reference features (cells weighted by the
  fraction of the cell the mask covers); background prototypes = N_b = 5 Voronoi regions of the reference's
  background cells (cells < 50 % covered and inside the image; seeds by farthest-point sampling from a
  seeded first point), each region's weighted mean.
* Eq. 3: pseudo-mask = cos(target cell, fg prototype) > max_j cos(target cell, bg prototype j). No learned
  refinement. The decision value (fg minus best bg similarity) is upsampled bilinearly from the feature grid
  to the image and thresholded at 0, then scored at full resolution with the FSS protocol (per-class
  intersection / union summed over episodes, mIoU = mean over classes, FB-IoU).

Backbones (images letterboxed like SAM: longest side to the frame, padding at the bottom / right):

* ``sam``      the embedded MobileSAM-class image encoder, 1024-px frame -> 256 x 64 x 64
* ``dino448``  DINOv2 ViT-S/14 (core.modeling.semantic_backbone), 448-px frame -> 384 x 32 x 32
* ``dino672``  the same at 672 px -> 384 x 48 x 48 (a finer grid, ~2.5x the time)

Rows ``all_fg`` (predict the whole image) is a floor that land-cover classes make non-trivial.
With ``--pipeline`` it also runs the method's ``ReferencePredictor`` in ``training_free`` mode (pseudo-mask ->
SAM prompts) on the same episodes, when that class exists.

Features are cached per image in ``--cache`` (float16 .npy) so a rerun only evaluates. Research-only images are
read in place from ../shared/data and never written anywhere but the /tmp feature cache.

    nice -n 10 .venv/bin/python scripts/feature_study.py --episodes 40 --json /tmp/feature_study.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.training.feature_cache import FeatureCache  # noqa: E402
from core.training.episodes import load_episode, open_dataset, sample_episodes  # noqa: E402
from core.training.metrics import FewShotMeter, format_table  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
N_BG = 5


# ----------------------------------------------------------------------------------------------------------------
# backbones: image -> (C x g x g features, (h', w') letterboxed size, frame size)

class SamFeatures:
    tag, frame = "sam", 1024

    def __init__(self) -> None:
        from core.modeling.engine import SamEngine
        from core.modeling.registry import build_sam

        self.engine = SamEngine(build_sam("embedded"), device="cpu", precision="fp32")

    def resized_hw(self, hw):
        return tuple(self.engine.input_size(hw))

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        x, _ = self.engine.preprocess(image)
        return self.engine.encode(x)[0]


class DinoFeatures:
    def __init__(self, size: int) -> None:
        from core.modeling.semantic_backbone import SemanticBackbone

        self.bb = SemanticBackbone(size=size, device="cpu")
        self.tag, self.frame = f"dino{size}", size

    def resized_hw(self, hw):
        return self.bb.letterbox_hw(hw)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.bb.features(image)[0]


def make_backbone(name: str):
    if name == "sam":
        return SamFeatures()
    m = re.fullmatch(r"dino(\d+)", name)
    if m:
        return DinoFeatures(int(m.group(1)))
    raise SystemExit(f"unknown backbone {name}")


# ----------------------------------------------------------------------------------------------------------------
# Eq. 1 and Eq. 3 on a feature grid

def grid_mask(mask: np.ndarray, resized_hw, frame: int, grid: int):
    """Coverage fraction of each grid cell (g x g) and the valid cells (at least half inside the image)."""
    h, w = resized_hw
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    m = F.pad(m, (0, frame - w, 0, frame - h))
    frac = F.adaptive_avg_pool2d(m, grid)[0, 0]
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * frame / grid
    valid = (centres[:, None] < h) & (centres[None, :] < w)
    return frac, valid


def valid_cells(resized_hw, frame: int, grid: int):
    h, w = resized_hw
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * frame / grid
    return (centres[:, None] < h) & (centres[None, :] < w)


def prototypes(feats: torch.Tensor, frac: torch.Tensor, valid: torch.Tensor, n_bg: int = N_BG, seed: int = 0):
    """feats C x g x g -> (fg C, bg n x C)."""
    c = feats.shape[0]
    wfg = frac * valid
    fg = (feats * wfg).sum((1, 2)) / wfg.sum().clamp_min(1e-6)
    bgcells = (frac < 0.5) & valid
    idx = bgcells.nonzero()
    if idx.shape[0] == 0:
        return fg, feats.new_zeros(0, c)
    g = feats.shape[-1]
    pts = (idx.float() + 0.5) / g
    gen = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(len(pts), (1,), generator=gen))]
    d = (pts - pts[chosen[0]]).pow(2).sum(-1)
    for _ in range(1, min(n_bg, len(pts))):
        nxt = int(d.argmax())
        if float(d[nxt]) <= 0:
            break
        chosen.append(nxt)
        d = torch.minimum(d, (pts - pts[nxt]).pow(2).sum(-1))
    lab = torch.cdist(pts, pts[chosen]).argmin(1)
    cf = feats[:, idx[:, 0], idx[:, 1]].T  # N x C
    wbg = (1 - frac[idx[:, 0], idx[:, 1]])[:, None]
    onehot = F.one_hot(lab, len(chosen)).float() * wbg
    bg = (onehot.T @ cf) / onehot.sum(0)[:, None].clamp_min(1e-6)
    return fg, bg


def margin(feats: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    f = F.normalize(feats, dim=0)
    s_fg = torch.einsum("chw,c->hw", f, F.normalize(fg, dim=0))
    if bg.shape[0] == 0:
        return s_fg - s_fg.mean()
    s_bg = torch.einsum("chw,nc->nhw", f, F.normalize(bg, dim=1)).max(0).values
    return s_fg - s_bg


def to_image(m: torch.Tensor, resized_hw, frame: int, out_hw) -> np.ndarray:
    """Grid decision values -> HxW bool at the original image size."""
    h, w = resized_hw
    up = F.interpolate(m[None, None], size=(frame, frame), mode="bilinear", align_corners=False)[..., :h, :w]
    up = F.interpolate(up, size=tuple(out_hw), mode="bilinear", align_corners=False)
    return (up[0, 0] > 0).numpy()


# ----------------------------------------------------------------------------------------------------------------

def extract(backbone, ds, indices, cache: FeatureCache) -> None:
    todo = [i for i in indices if not cache.has(ds.name, ds.items[i].key)]
    t0 = time.time()
    for n, i in enumerate(todo):
        cache.put(ds.name, ds.items[i].key, backbone(ds.image(i)))
        if (n + 1) % 10 == 0 or n + 1 == len(todo):
            el = time.time() - t0
            print(f"  {backbone.tag} {ds.name}: {n + 1}/{len(todo)} images, {el / (n + 1):.2f} s/image", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="nwpu_vhr10_dev,oam_buildings,dubai_landcover,spacenet_atlanta")
    ap.add_argument("--backbones", default="sam,dino448")
    ap.add_argument("--episodes", type=int, default=40, help="episodes per class")
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/virefsam_features"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--extract-only", action="store_true")
    ap.add_argument("--pipeline", action="store_true", help="also run ReferencePredictor(mode='training_free')")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    datasets = [open_dataset(DATA / n) for n in args.datasets.split(",") if n]
    plan = OrderedDict()
    for ds in datasets:
        eps = sample_episodes(ds, n=args.episodes, shots=args.shots, seed=args.seed)
        plan[ds.name] = (ds, eps)
        used = sorted({i for e in eps for i in (*e.support, e.query)})
        print(f"{ds.name}: {len(eps)} episodes over {len(ds.classes)} classes, {len(used)} images", flush=True)

    names = [b for b in args.backbones.split(",") if b]
    results = OrderedDict()
    for bname in names:
        bb = make_backbone(bname)
        for ds, eps in plan.values():
            extract(bb, ds, sorted({i for e in eps for i in (*e.support, e.query)}), FeatureCache(args.cache, bb.tag))
        if args.extract_only:
            continue
        for ds, eps in plan.values():
            meter = FewShotMeter()
            for ep in eps:
                data = load_episode(ds, ep)
                cache = FeatureCache(args.cache, bb.tag)
                sf = [cache.get(ds.name, ds.items[s].key) for s in ep.support]
                qf = cache.get(ds.name, ds.items[ep.query].key)
                g = qf.shape[-1]
                fracs, valids = [], []
                for img, m in zip(data.support_images, data.support_masks):
                    fr, va = grid_mask(m, bb.resized_hw(img.shape[:2]), bb.frame, g)
                    fracs.append(fr)
                    valids.append(va)
                # K shots pooled jointly: stack cells side by side
                feats = torch.cat(sf, dim=-1)
                fg, bgp = prototypes(feats, torch.cat(fracs, -1), torch.cat(valids, -1), seed=args.seed)
                qhw = bb.resized_hw(data.query_image.shape[:2])
                mg = margin(qf, fg, bgp)
                mg = torch.where(valid_cells(qhw, bb.frame, g), mg, torch.full_like(mg, -1.0))
                pred = to_image(mg, qhw, bb.frame, data.query_mask.shape)
                meter.update(ep.class_name, pred, data.query_mask, data.query_ignore)
            results.setdefault(ds.name, OrderedDict())[bb.tag] = meter
        del bb

    if not args.extract_only:
        for ds, eps in plan.values():
            meter = FewShotMeter()
            for ep in eps:
                data = load_episode(ds, ep)
                meter.update(ep.class_name, np.ones_like(data.query_mask), data.query_mask, data.query_ignore)
            results.setdefault(ds.name, OrderedDict())["all_fg"] = meter

    if args.pipeline and not args.extract_only:
        run_pipeline(plan, results)

    if args.extract_only:
        return 0
    report = OrderedDict(protocol=dict(shots=args.shots, episodes_per_class=args.episodes, seed=args.seed,
                                       n_bg=N_BG), results=OrderedDict())
    for dsname, rows in results.items():
        print()
        print(format_table(rows, title=f"{dsname}: {args.shots}-shot, {args.episodes} episodes/class, IoU %"))
        report["results"][dsname] = {k: m.summary() for k, m in rows.items()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def run_pipeline(plan, results) -> None:
    """The method's training-free predictor (pseudo-mask -> SAM prompts), when it exists."""
    try:
        from core.modeling.engine import SamEngine
        from core.modeling.predictor import ReferencePredictor
        from core.modeling.registry import build_sam
    except ImportError as exc:
        print(f"pipeline skipped: {exc}")
        return
    engine = SamEngine(build_sam("embedded"), device="cpu", precision="fp32")
    for ds, eps in plan.values():
        for mode in ("training_free",):
            meter = FewShotMeter()
            t0 = time.time()
            for n, ep in enumerate(eps):
                data = load_episode(ds, ep)
                pred = ReferencePredictor(engine, mode=mode, adapters=None)
                pred.set_references(data.references)
                prob = pred.predict(data.query_image)
                meter.update(ep.class_name, prob > 0.5, data.query_mask, data.query_ignore)
                if (n + 1) % 20 == 0:
                    print(f"  {mode} {ds.name}: {n + 1}/{len(eps)} ({(time.time() - t0) / (n + 1):.1f} s/ep)",
                          flush=True)
            results.setdefault(ds.name, OrderedDict())[f"pipeline_{mode}"] = meter


if __name__ == "__main__":
    sys.exit(main())
