"""How much a run depends on which houses the analyst marks (issue #20, item 6): the spread over reference picks.

The reference raster is the shared 4096 x 4096 Zanzibar orthophoto (``../shared/data/oam_mosaics/zanzibar.tif``)
with its OSM building raster; houses within 512 px of the demo's Zanzibar target are left out. Each pick takes one
house at random (seeded) and its K - 1 nearest neighbours, as an analyst marks a few houses in view, runs the
demo's pipeline (both demo targets) with the same parameters otherwise, and scores it against OSM as ``make demo``
does. The
report gives each pick's IoU per target and the mean, standard deviation, minimum and maximum.

    python scripts/reference_spread.py --picks 6 --houses 3 --json out/spread.json [--adapters none] [--kshot joint]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.demo import TARGETS, _osm, demo_params, score  # noqa: E402
from core.params import ReferenceSpec  # noqa: E402
from core.pipeline import run as run_pipeline  # noqa: E402

MOSAIC = ROOT.parent / "shared" / "data" / "oam_mosaics" / "zanzibar.tif"
BUILDINGS = MOSAIC.with_name("zanzibar_buildings.tif")


def houses_in_mosaic(min_px: int = 400, keep_off: int = 512):
    """Whole OSM footprints of the mosaic (polygons in its CRS) of at least ``min_px`` pixels, none within
    ``keep_off`` pixels of the demo's Zanzibar target."""
    import numpy as np
    import rasterio
    from rasterio import features
    from rasterio.windows import from_bounds
    from scipy import ndimage
    from shapely.geometry import shape

    with rasterio.open(BUILDINGS) as src:
        mask = src.read(1) > 0
        transform, crs = src.transform, src.crs
        with rasterio.open(TARGETS["zanzibar"]) as t:
            w = from_bounds(*t.bounds, transform=transform)
    r0, c0 = int(w.row_off) - keep_off, int(w.col_off) - keep_off
    r1, c1 = int(w.row_off + w.height) + keep_off, int(w.col_off + w.width) + keep_off
    labels, n = ndimage.label(mask)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))) - {0}
    out = []
    for geom, value in features.shapes(labels.astype("int32"), mask=mask, transform=transform):
        v = int(value)
        if v in border or areas[v] < min_px:
            continue
        poly = shape(geom)
        col, row = ~transform * (poly.centroid.x, poly.centroid.y)
        if r0 <= row <= r1 and c0 <= col <= c1:
            continue
        out.append(poly)
    return out, crs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--picks", type=int, default=6)
    p.add_argument("--houses", type=int, default=3, help="houses marked per pick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapters", default="default")
    p.add_argument("--kshot", default="ensemble")
    p.add_argument("--tune-steps", type=int, default=0)
    p.add_argument("--no-zoom-views", dest="zoom_views", action="store_false",
                   help="no zoomed views of a one-crop reference (RunParams.zoom_views False)")
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args(argv)
    import rasterio

    houses, crs = houses_in_mosaic()
    rng = random.Random(a.seed)
    centres = [(h.centroid.x, h.centroid.y) for h in houses]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.picks):
            first = rng.randrange(len(houses))
            x0, y0 = centres[first]
            pick = sorted(range(len(houses)), key=lambda j: (centres[j][0] - x0) ** 2 + (centres[j][1] - y0) ** 2)
            pick = pick[: a.houses]
            ref = ReferenceSpec(raster=str(MOSAIC), foreground=tuple(houses[j].wkt for j in pick),
                                crs=crs.to_string(), ref_id=f"pick{i}")
            params = dataclasses.replace(demo_params(Path(tmp), adapters=a.adapters), references=(ref,),
                                         kshot=a.kshot, tune_steps=a.tune_steps, zoom_views=a.zoom_views, output=str(Path(tmp) / f"p{i}.gpkg"))
            result = run_pipeline(params)
            row = {"pick": i, "houses": pick, "scale": result.scale}
            for (name, raster), t in zip(TARGETS.items(), result.targets):
                with rasterio.open(raster) as ds:
                    s = score([f.geometry for f in t.features], _osm(name), (ds.height, ds.width), ds.transform)
                row[name] = round(s["iou"], 4)
            rows.append(row)
            print(f"pick {i}: houses {pick}: " + "  ".join(f"{n} {row[n]:.3f}" for n in TARGETS), flush=True)
    summary = {}
    for name in TARGETS:
        v = [r[name] for r in rows]
        summary[name] = {"mean": round(statistics.mean(v), 4), "std": round(statistics.pstdev(v), 4),
                         "min": min(v), "max": max(v)}
    report = {"command": "python scripts/reference_spread.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "houses_available": len(houses), "picks": rows, "summary": summary}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(report, indent=1))
    for name, s in summary.items():
        print(f"{name}: IoU mean {s['mean']:.3f}, std {s['std']:.3f}, min {s['min']:.3f}, max {s['max']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
