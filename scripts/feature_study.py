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
With ``--pipeline`` it also runs the method's ``ReferencePredictor`` on the same episodes: ``training_free``
(SAM-feature prototypes -> pseudo-mask -> per-component SAM prompts -> filter -> union) and ``static_prompt``
(the reference mask's own points/boxes replayed on the target), through the same cached SAM embeddings.

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
    """SAM's frozen encoder through the on-disk cache keyed by input (shared with the pipeline rows)."""

    tag, frame = "sam", 1024

    def __init__(self, cache_root: Path) -> None:
        from core.modeling.engine import SamEngine
        from core.modeling.registry import build_sam
        from core.training.feature_cache import CachedEngine, model_tag

        sam = build_sam("embedded")
        self.engine = CachedEngine(SamEngine(sam, device="cpu", precision="fp32"),
                                   FeatureCache(cache_root, model_tag(sam, "sam-embedded")))

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


def make_backbone(name: str, cache_root: Path):
    if name == "sam":
        return SamFeatures(cache_root)
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


def upsample(m: torch.Tensor, resized_hw, frame: int, out_hw) -> np.ndarray:
    """Grid decision values -> HxW float at the original image size (bilinear, via the letterboxed frame)."""
    h, w = resized_hw
    up = F.interpolate(m[None, None], size=(frame, frame), mode="bilinear", align_corners=False)[..., :h, :w]
    up = F.interpolate(up, size=tuple(out_hw), mode="bilinear", align_corners=False)
    return up[0, 0].numpy()


def center(feats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Remove an image's mean feature (over its valid cells)."""
    mean = feats[:, valid].mean(dim=1) if valid.any() else feats.flatten(1).mean(1)
    return feats - mean[:, None, None]


def auc(score: np.ndarray, gt: np.ndarray, ignore=None, stride: int = 4) -> float:
    """ROC-AUC of a score map against a mask (pixels on a stride-4 lattice; ties get average ranks)."""
    from scipy.stats import rankdata

    s, t = score[::stride, ::stride].ravel(), gt[::stride, ::stride].ravel()
    if ignore is not None:
        keep = ~ignore[::stride, ::stride].ravel()
        s, t = s[keep], t[keep]
    npos, nneg = int(t.sum()), int((~t).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[t].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def auc_table(per_row, title: str) -> str:
    classes = list(next(iter(per_row.values())))
    w0 = max(len(r) for r in per_row)
    lines = [title, " " * w0 + "  " + "  ".join(c.rjust(max(len(c), 6)) for c in classes) + "    mean"]
    for r, per in per_row.items():
        vals = [100 * float(np.nanmean(per[c])) for c in classes]
        lines.append(r.ljust(w0) + "  " + "  ".join(f"{v:.1f}".rjust(max(len(c), 6)) for c, v in zip(classes, vals))
                     + f"  {np.mean(vals):6.1f}")
    return "\n".join(lines)


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
    ap.add_argument("--subset", type=int, default=None,
                    help="evaluate only the first N of each class's --episodes (same episodes, fewer)")
    ap.add_argument("--center", action="store_true", help="also rows '+c': per-image mean feature removed")
    ap.add_argument("--pipeline", action="store_true", help="also run ReferencePredictor(mode='training_free')")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    datasets = [open_dataset(DATA / n) for n in args.datasets.split(",") if n]
    plan = OrderedDict()
    for ds in datasets:
        eps = sample_episodes(ds, n=args.episodes, shots=args.shots, seed=args.seed)
        if args.subset:  # the first N episodes of each class of the same list
            eps = [e for c in ds.classes for e in [x for x in eps if x.class_id == c][: args.subset]]
        plan[ds.name] = (ds, eps)
        used = sorted({i for e in eps for i in (*e.support, e.query)})
        print(f"{ds.name}: {len(eps)} episodes over {len(ds.classes)} classes, {len(used)} images", flush=True)

    names = [b for b in args.backbones.split(",") if b]
    backbones = OrderedDict()
    for bname in names:
        bb = make_backbone(bname, args.cache)
        for ds, eps in plan.values():
            extract(bb, ds, sorted({i for e in eps for i in (*e.support, e.query)}), FeatureCache(args.cache, bb.tag))
        backbones[bname] = bb
    if args.extract_only:
        return 0

    results, aucs = OrderedDict(), OrderedDict()
    variants = ("", "+c") if args.center else ("",)
    for ds, eps in plan.values():
        rows = results.setdefault(ds.name, OrderedDict())
        arows = aucs.setdefault(ds.name, OrderedDict())
        t0 = time.time()
        for n, ep in enumerate(eps):
            data = load_episode(ds, ep)
            for bname, bb in backbones.items():
                cache = FeatureCache(args.cache, bb.tag)
                sf = [cache.get(ds.name, ds.items[s].key) for s in ep.support]
                qf = cache.get(ds.name, ds.items[ep.query].key)
                g = qf.shape[-1]
                fracs, valids = [], []
                for img, m in zip(data.support_images, data.support_masks):
                    fr, va = grid_mask(m, bb.resized_hw(img.shape[:2]), bb.frame, g)
                    fracs.append(fr)
                    valids.append(va)
                qhw = bb.resized_hw(data.query_image.shape[:2])
                qvalid = valid_cells(qhw, bb.frame, g)
                for var in variants:
                    s_list, q = sf, qf
                    if var == "+c":  # centred: each image's mean feature (over its valid cells) removed
                        s_list = [center(f, v) for f, v in zip(sf, valids)]
                        q = center(qf, qvalid)
                    # K shots pooled jointly: cells side by side
                    fg, bgp = prototypes(torch.cat(s_list, -1), torch.cat(fracs, -1), torch.cat(valids, -1),
                                         seed=args.seed)
                    mg = margin(q, fg, bgp)
                    mg = torch.where(qvalid, mg, torch.full_like(mg, -1.0))
                    score = upsample(mg, qhw, bb.frame, data.query_mask.shape)
                    row = bb.tag + var
                    rows.setdefault(row, FewShotMeter()).update(ep.class_name, score > 0, data.query_mask,
                                                               data.query_ignore)
                    arows.setdefault(row, OrderedDict()).setdefault(ep.class_name, []).append(
                        auc(score, data.query_mask, data.query_ignore))
            rows.setdefault("all_fg", FewShotMeter()).update(ep.class_name, np.ones_like(data.query_mask),
                                                             data.query_mask, data.query_ignore)
            if (n + 1) % 40 == 0:
                print(f"  {ds.name}: {n + 1}/{len(eps)} episodes ({(time.time() - t0) / (n + 1):.2f} s/ep)",
                      flush=True)
    sam_engine = backbones["sam"].engine if "sam" in backbones else None
    del backbones

    if args.pipeline and not args.extract_only:
        run_pipeline(plan, results, sam_engine or SamFeatures(args.cache).engine, args.cache / "pipeline_episodes.jsonl")

    report = OrderedDict(protocol=dict(shots=args.shots, episodes_per_class=args.episodes, subset=args.subset,
                                       seed=args.seed, n_bg=N_BG), results=OrderedDict())
    for dsname, rows in results.items():
        print()
        n_ep = args.subset or args.episodes
        print(format_table(rows, title=f"{dsname}: {args.shots}-shot, {n_ep} episodes/class, IoU %"))
        report["results"][dsname] = {k: m.summary() for k, m in rows.items()}
        if aucs.get(dsname):
            print(auc_table(aucs[dsname], f"{dsname}: mean per-episode ROC-AUC (%) of the Eq. 3 decision value"))
            report["auc"] = report.get("auc", OrderedDict())
            report["auc"][dsname] = {r: {c: round(100 * float(np.nanmean(v)), 2) for c, v in per.items()}
                                     for r, per in aucs[dsname].items()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def run_pipeline(plan, results, engine, log_path: Path) -> None:
    """The method's predictor (pseudo-mask -> SAM prompts; and the static-prompt baseline) on the same episodes.

    Each episode's pixel counts are appended to ``log_path`` (JSON lines) as soon as they exist, and episodes
    found there are not run again: an interrupted run continues where it stopped.
    """
    from core.modeling.predictor import ReferencePredictor
    from core.training.metrics import intersection_union

    done = {}
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            done[(r["mode"], r["dataset"], r["episode"])] = r
    with open(log_path, "a") as log:
        for ds, eps in plan.values():
            for mode in ("training_free", "static_prompt"):
                pred = ReferencePredictor(engine, mode=mode)
                meter = FewShotMeter()
                t0, ran = time.time(), 0
                for n, ep in enumerate(eps):
                    key = json.dumps(ep.to_dict(), sort_keys=True)
                    r = done.get((mode, ds.name, key))
                    if r is None:
                        data = load_episode(ds, ep)
                        pred.set_references(data.references)
                        prob = pred.predict(data.query_image)
                        (i_bg, u_bg), (i_fg, u_fg) = intersection_union(prob > 0.5, data.query_mask,
                                                                        data.query_ignore)
                        r = dict(mode=mode, dataset=ds.name, episode=key, i_fg=i_fg, u_fg=u_fg, i_bg=i_bg, u_bg=u_bg)
                        log.write(json.dumps(r) + "\n")
                        log.flush()
                        ran += 1
                    meter.add_counts(ep.class_name, r["i_fg"], r["u_fg"], r["i_bg"], r["u_bg"])
                    if ran and (n + 1) % 40 == 0:
                        print(f"  {mode} {ds.name}: {n + 1}/{len(eps)} ({(time.time() - t0) / ran:.2f} s/ep run)",
                              flush=True)
                results.setdefault(ds.name, OrderedDict())[f"sam_{mode}"] = meter


if __name__ == "__main__":
    sys.exit(main())
