"""Cut the bundled demo samples out of ../shared/data/oam_mosaics (run once; its output is committed).

OpenAerialMap imagery (CC BY 4.0) and OpenStreetMap building footprints (ODbL 1.0): see
resources/demo/ATTRIBUTION.md. Writes into resources/demo/:
  reference.tif            a Zanzibar cut-out, the scene where the analyst marks a few houses
  reference_houses.geojson those few houses (OSM footprints), the reference geometry of the demo
  target_zanzibar.tif      another, non-overlapping Zanzibar cut-out
  target_kampala.tif       a Kampala cut-out (other roofs: a cross-scene target)
  osm_<name>.geojson       OSM footprints of each target, used only to score the demo's output
"""

import json
import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio import features
from rasterio.windows import Window
from scipy import ndimage
from shapely.geometry import mapping, shape

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT.parent / "shared" / "data" / "oam_mosaics"
DST = ROOT / "resources" / "demo"

CUTS = {
    # name: (mosaic, row_off, col_off, size)
    "reference": ("zanzibar", 1024, 0, 1024),
    "target_zanzibar": ("zanzibar", 0, 1024, 1536),
    "target_kampala": ("kampala", 0, 0, 1024),
}
# the reference houses: labelled components of the reference cut-out, chosen by their centre (col, row)
REFERENCE_HOUSES = 4


def cut(name, mosaic, row, col, size):
    win = Window(col, row, size, size)
    with rasterio.open(SRC / f"{mosaic}.tif") as src, rasterio.open(SRC / f"{mosaic}_buildings.tif") as lab:
        img = src.read(window=win)
        mask = lab.read(1, window=win) > 0
        transform = src.window_transform(win)
        profile = dict(
            driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs=src.crs, transform=transform,
            compress="jpeg", jpeg_quality=88, photometric="ycbcr", tiled=True, blockxsize=256, blockysize=256,
        )
        with rasterio.open(DST / f"{name}.tif", "w", **profile) as dst:
            dst.write(img)
            dst.build_overviews([2, 4], rasterio.enums.Resampling.average)
        crs = src.crs
    return mask, transform, crs


def polygons(mask, transform):
    return [
        shape(geom).buffer(0)
        for geom, val in features.shapes(mask.astype(np.uint8), mask=mask, transform=transform)
        if val == 1
    ]


def write_geojson(path, geoms, crs, props=None):
    fc = {
        "type": "FeatureCollection",
        "name": path.stem,
        "crs": {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{crs.to_epsg()}"}},
        "features": [
            {"type": "Feature", "properties": (props or {}), "geometry": mapping(g)} for g in geoms
        ],
    }
    path.write_text(json.dumps(fc))


def main() -> int:
    DST.mkdir(parents=True, exist_ok=True)
    for name, (mosaic, row, col, size) in CUTS.items():
        mask, transform, crs = cut(name, mosaic, row, col, size)
        if name == "reference":
            lab, n = ndimage.label(mask)
            sizes = ndimage.sum(mask, lab, range(1, n + 1))
            # mid-sized, whole houses (not touching the cut's border), largest first
            border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])))
            ids = [i + 1 for i in np.argsort(-sizes) if i + 1 not in border and 3000 < sizes[i] < 40000]
            chosen = ids[:REFERENCE_HOUSES]
            geoms = polygons(np.isin(lab, chosen), transform)
            write_geojson(DST / "reference_houses.geojson", geoms, crs, {"class": "building"})
            print(f"reference: {len(geoms)} houses, {int(sizes[np.array(chosen) - 1].sum())} px")
        else:
            geoms = polygons(mask, transform)
            write_geojson(DST / f"osm_{name.replace('target_', '')}.geojson", geoms, crs)
            print(f"{name}: {len(geoms)} OSM footprints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
