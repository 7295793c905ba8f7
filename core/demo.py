"""``python -m core demo`` (``make demo``): the whole job on the bundled samples.

Reference: four houses marked (OSM footprints) in ``resources/demo/reference.tif``, a Zanzibar cut-out.
Targets: another Zanzibar cut-out and a Kampala cut-out (other roofs: a cross-scene target).
Writes ``OUT/demo.gpkg`` (one layer per target), ``OUT/demo.png`` (the polygons over the imagery, with the
reference and the OSM footprints) and ``OUT/demo_scores.json``, and prints how well the polygons match the
OpenStreetMap footprints of the targets: pixel IoU, precision, recall, and the share of OSM houses found.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from .paths import RESOURCES
from .params import DEFAULT_TUNE_STEPS, TUNE_FILES, ModelParams, ReferenceSpec, RunParams

DEMO = RESOURCES / "demo"
TARGETS = {"zanzibar": DEMO / "target_zanzibar.tif", "kampala": DEMO / "target_kampala.tif"}


def add_arguments(p) -> None:
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--mode", default="virefsam", choices=("virefsam", "training_free", "static_prompt"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--scale", default="auto", help="working scale: auto (default) or a zoom such as 0.5 or 1")
    p.add_argument("--spread", action="store_true",
                   help="the spread-reference variant: houses marked far apart on the reference raster")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="encoder precision (fp16: CUDA only; default fp32)")
    p.add_argument("--adapters", default="auto",
                   help="trained adapters: auto (default), default (the main shipped file), none (training-free) "
                        "or a .pt file, as for segment")
    p.add_argument("--tune-steps", type=int, default=DEFAULT_TUNE_STEPS,
                   help="trained mode: tune VCP on the references for this many steps first (as for segment)")
    p.add_argument("--tune-files", default=TUNE_FILES[0], choices=TUNE_FILES,
                   help="--tune-steps: which adapters files are tuned (as for segment)")
    p.add_argument("--no-zoom-views", dest="zoom_views", action="store_false",
                   help="trained mode: no zoomed views of the one-crop reference (as for segment)")
    p.add_argument("--no-exclude-found", dest="exclude_found", action="store_false",
                   help="trained mode: keep unmarked objects found in the reference crop in the background (as for "
                        "segment)")
    p.add_argument("--no-self-support", dest="self_support", action="store_false",
                   help="trained mode: decode the targets from the reference alone (as for segment)")
    p.add_argument("--adapted-precision", default="int8", choices=("int8", "fp32"),
                   help="weights of the adapted (DTA) pass where it runs in ONNX Runtime: int8 (default, about 1.5x faster on a CPU, masks at IoU >= 0.99 with fp32) or fp32")
    p.add_argument("--quiet", action="store_true")


def demo_params(out: Path, mode: str = "virefsam", device: str = "auto", scale: str = "auto",
                spread: bool = False, precision: str = "fp32", adapters: str = "auto",
                adapted_precision: str = "int8", tune_steps: int = DEFAULT_TUNE_STEPS, zoom_views: bool = True,
                tune_files: str = "vcp_alone", exclude_found: bool = True, self_support: bool = True) -> RunParams:
    from .segment_cli import read_geometries

    fg, bg, crs = read_geometries(str(DEMO / "reference_houses.geojson"))
    params = RunParams(
        class_name="building",
        references=(ReferenceSpec(raster=str(DEMO / "reference.tif"), foreground=fg, background=bg, crs=crs,
                                  ref_id="demo_houses"),),
        targets=tuple(str(p) for p in TARGETS.values()),
        output=str(out / "demo.gpkg"),
        overwrite=True,
        model=ModelParams(device=device, precision=precision, adapted_precision=adapted_precision,
                          adapters=None if str(adapters).lower() == "none" else adapters),
        mode=mode,
        scale=scale,
        tune_steps=tune_steps,
        tune_files=tune_files,
        zoom_views=zoom_views,
        exclude_found=exclude_found,
        self_support=self_support,
    )
    if spread:
        params = dataclasses.replace(params, references=(spread_reference(),))
    return params


# The spread-reference variant (``--spread``): four houses of the shared 4096 x 4096 Zanzibar orthophoto,
# 1,000 to 3,500 pixels apart (centres as (col, row)), none within a tile of the demo's Zanzibar target.
SPREAD_MOSAIC = RESOURCES.parent.parent / "shared" / "data" / "oam_mosaics" / "zanzibar.tif"
SPREAD_HOUSES = ((4050, 375), (1587, 2358), (1293, 2410), (919, 3852))


def spread_reference(mosaic: Path = SPREAD_MOSAIC) -> ReferenceSpec:
    """The spread-reference variant's reference: the OSM footprints (from the mosaic's building mask) of the
    houses whose centres are :data:`SPREAD_HOUSES`."""
    import rasterio
    from rasterio import features
    from scipy import ndimage
    from shapely.geometry import shape

    from .errors import InputError

    labels_path = mosaic.with_name(mosaic.stem + "_buildings.tif")
    if not mosaic.is_file() or not labels_path.is_file():
        raise InputError(f"The spread-reference demo needs the shared orthophoto {mosaic} and its building mask.")
    with rasterio.open(labels_path) as ds:
        lab, _ = ndimage.label(ds.read(1) > 0)
        transform, crs = ds.transform, ds.crs
    wkts = []
    for col, row in SPREAD_HOUSES:
        k = int(lab[row, col])
        polys = [shape(g) for g, v in features.shapes((lab == k).astype(np.uint8), transform=transform) if v == 1]
        wkts.append(max(polys, key=lambda p: p.area).wkt)
    return ReferenceSpec(raster=str(mosaic), foreground=tuple(wkts), crs=crs.to_string(), ref_id="spread_houses")


def _rasterize(geoms, shape, transform) -> np.ndarray:
    from rasterio import features

    geoms = [g for g in geoms if g is not None and not g.is_empty]
    if not geoms:
        return np.zeros(shape, bool)
    return features.rasterize(geoms, out_shape=shape, transform=transform, dtype="uint8") > 0


def _osm(name: str):
    from shapely.geometry import shape

    fc = json.loads((DEMO / f"osm_{name}.geojson").read_text())
    return [shape(f["geometry"]) for f in fc["features"]]


def score(pred_geoms, osm_geoms, shape, transform) -> Dict[str, float]:
    """Pixel IoU / precision / recall of the polygons against OSM, and the share of OSM houses found
    (a house counts as found when polygons cover at least half of it)."""
    pred = _rasterize(pred_geoms, shape, transform)
    gt = _rasterize(osm_geoms, shape, transform)
    inter, union = float((pred & gt).sum()), float((pred | gt).sum())
    found = 0
    for g in osm_geoms:
        m = _rasterize([g], shape, transform)
        if m.sum() and (m & pred).sum() >= 0.5 * m.sum():
            found += 1
    return {
        "iou": inter / union if union else 1.0,
        "precision": inter / pred.sum() if pred.sum() else 0.0,
        "recall": inter / gt.sum() if gt.sum() else 1.0,
        "osm_houses": len(osm_geoms),
        "houses_found": found,
        "polygons": len(pred_geoms),
    }


def render(result, params: RunParams, path: Path, width: int = 640) -> None:
    """A PNG: the reference with its marked houses, then each target with the polygons found (yellow) and the
    OSM footprints (thin cyan)."""
    import rasterio
    from PIL import Image, ImageDraw

    def panel(raster, geoms_styles, title):
        with rasterio.open(raster) as ds:
            f = max(ds.width, ds.height) / width
            h, w = int(round(ds.height / f)), int(round(ds.width / f))
            img = ds.read([1, 2, 3], out_shape=(3, h, w)).transpose(1, 2, 0)
            inv = ~(ds.transform * rasterio.Affine.scale(f))
        im = Image.fromarray(np.ascontiguousarray(img)).convert("RGB")
        draw = ImageDraw.Draw(im, "RGBA")
        for geoms, outline, fill, lw in geoms_styles:
            for g in geoms:
                for poly in getattr(g, "geoms", [g]):
                    pts = [inv * xy for xy in poly.exterior.coords]
                    if len(pts) > 2:
                        draw.polygon(pts, fill=fill, outline=None)
                        draw.line(pts + [pts[0]], fill=outline, width=lw)
        draw.rectangle([0, 0, w, 22], fill=(0, 0, 0, 160))
        draw.text((6, 5), title, fill=(255, 255, 255))
        return im

    from shapely import wkt

    ref = params.references[0]
    panels = [panel(ref.raster, [([wkt.loads(s) for s in ref.foreground], (255, 40, 40), (255, 40, 40, 90), 2)],
                    "reference: 4 marked houses")]
    for (name, raster), t in zip(TARGETS.items(), result.targets):
        geoms = [f.geometry for f in t.features]
        panels.append(panel(raster, [(_osm(name), (0, 230, 255), None, 1), (geoms, (255, 230, 0), (255, 230, 0, 70), 2)],
                            f"{name}: {len(geoms)} polygons (yellow), OSM (cyan)"))
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), max(p.height for p in panels)),
                       "white")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + 8
    canvas.save(path)


def run(args) -> int:
    import rasterio

    from .pipeline import run as run_pipeline
    from .segment_cli import _Progress

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = demo_params(out, args.mode, args.device, args.scale, args.spread, getattr(args, "precision", "fp32"),
                         getattr(args, "adapters", "auto"), getattr(args, "adapted_precision", "int8"),
                         getattr(args, "tune_steps", DEFAULT_TUNE_STEPS), getattr(args, "zoom_views", True),
                         getattr(args, "tune_files", "vcp_alone"), getattr(args, "exclude_found", True),
                         self_support=getattr(args, "self_support", True))
    from .run_output import vector_writing_available

    if not vector_writing_available():  # a bare pip environment (e.g. a CUDA machine): score in memory
        print("GDAL's Python bindings (osgeo) are missing: the polygons are scored in memory, demo.gpkg is "
              "not written.")
        params = dataclasses.replace(params, output=None)
    progress = _Progress(args.quiet)
    t0 = time.perf_counter()
    try:
        result = run_pipeline(params, progress=progress)
    finally:
        progress.close()
    scores: List[dict] = []
    print(f"ViRefSAM demo: class 'building', 1 reference (4 houses), mode {result.targets and params.mode}, "
          f"model {result.targets[0].features[0].attributes['model'] if result.targets[0].features else params.model.name}")
    print(f"  {result.scale}")
    for note in result.notes:
        if note.startswith(("Adapters auto:", "The marks of")):  # the files the reference weighed; partial marks
            print(f"  {note}")
    for (name, raster), t in zip(TARGETS.items(), result.targets):
        with rasterio.open(raster) as ds:
            s = score([f.geometry for f in t.features], _osm(name), (ds.height, ds.width), ds.transform)
        s.update(target=name, seconds=round(t.seconds, 1))
        scores.append(s)
        print(f"  {name:9s} {s['polygons']:3d} polygons  vs OSM: IoU {s['iou']:.2f}  precision {s['precision']:.2f}  "
              f"recall {s['recall']:.2f}  houses found {s['houses_found']}/{s['osm_houses']}  ({t.seconds:.0f} s)")
    render(result, params, out / "demo.png")
    (out / "demo_scores.json").write_text(json.dumps({"scores": scores, "scale": result.scale, "timings": result.timings,
                                                       "seconds": result.seconds,
                                                       "adapters": result.params.model.adapters}, indent=2))
    print(f"Wrote {result.output + ', ' if result.output else ''}{out / 'demo.png'} and {out / 'demo_scores.json'} "
          f"in {time.perf_counter() - t0:.0f} s.")
    return 0
