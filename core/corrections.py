"""``python -m core corrections``: one round of corrections measured on a shared orthophoto.

What an analyst does after a first run, done by a fixed rule so that it can be repeated:

1. a default run: the demo's reference (four Zanzibar houses, ``resources/demo``) on a window of a shared
   orthophoto (``../shared/data/oam_mosaics``: ``zanzibar`` = the demo's Zanzibar target, a 1536 x 1536 window
   that the reference does not overlap; ``kampala`` = the 1024 x 1024 top-left corner, another city);
2. up to ``N`` result polygons are marked "Not building" (:func:`false_positives`: the largest polygons of which
   less than :data:`MAX_TRUTH_SHARE` of the area lies on the OpenStreetMap footprints of ``*_buildings.tif``);
3. the same run again with those polygons as a negative reference on the target (a :class:`ReferenceSpec`
   with background marks only);
4. pixel precision / recall / IoU of both runs against the footprints, and the number of polygons; for scale,
   also the scores of the first run with just the picked polygons deleted (``only_removed``).

Writes ``OUT/corrections.json`` and prints one line per scene and run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from .params import ModelParams, ReferenceSpec, RunParams

MOSAICS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "oam_mosaics"
# scene -> (mosaic file stem, window offset (col, row), window size)
SCENES = {"zanzibar": ("zanzibar", (1024, 0), 1536), "kampala": ("kampala", (0, 0), 1024)}
MAX_TRUTH_SHARE = 0.05  # a result polygon with less than 5 % of its area on the footprints is a false positive


def add_arguments(p) -> None:
    p.add_argument("--out", default="out/corrections", help="output folder (default: out/corrections)")
    p.add_argument("--scenes", nargs="+", default=["zanzibar", "kampala"], choices=sorted(SCENES))
    p.add_argument("--negatives", type=int, default=5, help="result polygons marked 'Not building' (default 5)")
    p.add_argument("--mode", default="virefsam", choices=("virefsam", "training_free"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--mosaics", default=str(MOSAICS), help="folder of the shared orthophotos")


def scene_window(scene: str, folder: Path, out: Path):
    """(target raster: a VRT window of the orthophoto, its truth: the same window of the footprints mask)."""
    from .bench.inputs import mosaic_vrt
    from .errors import InputError

    stem, offset, size = SCENES[scene]
    image, truth = folder / f"{stem}.tif", folder / f"{stem}_buildings.tif"
    if not image.is_file() or not truth.is_file():
        raise InputError(f"The corrections measurement needs the shared orthophoto {image} and its footprints.")
    out.mkdir(parents=True, exist_ok=True)
    return (mosaic_vrt(str(image), size, str(out / f"{scene}.vrt"), offset),
            mosaic_vrt(str(truth), size, str(out / f"{scene}_truth.vrt"), offset))


def _truth(path: str):
    import rasterio

    with rasterio.open(path) as ds:
        return ds.read(1) > 0, ds.transform, ds.crs.to_string()


def _mask(geoms, shape, transform) -> np.ndarray:
    from rasterio import features

    geoms = [g for g in geoms if g is not None and not g.is_empty]
    if not geoms:
        return np.zeros(shape, bool)
    return features.rasterize(geoms, out_shape=shape, transform=transform, dtype="uint8") > 0


def score(geoms, truth: np.ndarray, transform) -> Dict[str, float]:
    """Pixel IoU, precision and recall of polygons against a truth mask on the same grid."""
    pred = _mask(geoms, truth.shape, transform)
    inter, union = float((pred & truth).sum()), float((pred | truth).sum())
    return {"iou": inter / union if union else 1.0, "precision": inter / pred.sum() if pred.sum() else 0.0,
            "recall": inter / truth.sum() if truth.sum() else 1.0, "polygons": len(geoms)}


def false_positives(geoms: Sequence, truth: np.ndarray, transform, n: int = 5,
                    max_share: float = MAX_TRUTH_SHARE) -> List:
    """The analyst's rule: the ``n`` largest polygons with less than ``max_share`` of their area on the truth."""
    picked = []
    for g in sorted(geoms, key=lambda g: -g.area):
        m = _mask([g], truth.shape, transform)
        if m.sum() and (m & truth).sum() < max_share * m.sum():
            picked.append(g)
            if len(picked) == n:
                break
    return picked


def correction_round(params: RunParams, truth_path: str, n: int = 5, progress=None) -> Dict[str, object]:
    """Run ``params`` (one target), mark up to ``n`` false positives "Not <class>", run again; scores of both."""
    from .pipeline import run

    truth, transform, crs = _truth(truth_path)
    t0 = time.perf_counter()
    first = run(params, progress=progress)
    geoms = [f.geometry for f in first.targets[0].features]
    picked = false_positives(geoms, truth, transform, n)
    negative = ReferenceSpec(raster=params.targets[0], foreground=(), background=tuple(g.wkt for g in picked),
                             crs=crs, ref_id="not_" + params.class_name)
    second_params = dataclasses.replace(params, references=params.references + (negative,))
    t1 = time.perf_counter()
    second = run(second_params, progress=progress) if picked else first
    after = [f.geometry for f in second.targets[0].features]
    still = sum(1 for g in picked if any(g.intersects(a) for a in after))
    kept = [g for g in geoms if not any(g is p for p in picked)]
    return {"before": score(geoms, truth, transform), "after": score(after, truth, transform),
            "only_removed": score(kept, truth, transform),  # the picked polygons deleted by hand, nothing else
            "negatives": len(picked), "negatives_still_hit": still, "notes": second.notes,
            "seconds": [round(t1 - t0, 1), round(time.perf_counter() - t1, 1)],
            "params": second_params.to_dict()}


def scene_params(scene: str, target: str, mode: str = "virefsam", device: str = "auto") -> RunParams:
    from .demo import DEMO
    from .segment_cli import read_geometries

    fg, bg, crs = read_geometries(str(DEMO / "reference_houses.geojson"))
    return RunParams(
        class_name="building",
        references=(ReferenceSpec(raster=str(DEMO / "reference.tif"), foreground=fg, background=bg, crs=crs,
                                  ref_id="demo_houses"),),
        targets=(target,), model=ModelParams(device=device), mode=mode,
    )


def run(args) -> int:
    out = Path(args.out)
    rows = {}
    for scene in args.scenes:
        target, truth = scene_window(scene, Path(args.mosaics), out)
        r = correction_round(scene_params(scene, target, args.mode, args.device), truth, args.negatives)
        rows[scene] = r
        for which in ("before", "after"):
            s = r[which]
            print(f"{scene:9s} {which:6s} precision {s['precision']:.3f}  recall {s['recall']:.3f}  "
                  f"IoU {s['iou']:.3f}  {s['polygons']} polygons")
        d = {k: r["after"][k] - r["before"][k] for k in ("precision", "recall", "iou")}
        print(f"{scene:9s} {r['negatives']} negatives: precision {d['precision']:+.3f}, recall {d['recall']:+.3f}, "
              f"IoU {d['iou']:+.3f}; {r['negatives_still_hit']} of them still hit; {r['seconds']} s; deleting just "
              f"them: precision {r['only_removed']['precision'] - r['before']['precision']:+.3f}")
    (out / "corrections.json").write_text(json.dumps(rows, indent=2, default=str))
    print(f"Wrote {out / 'corrections.json'}.")
    return 0
