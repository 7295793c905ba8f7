"""``python -m core segment``: segment target rasters from a reference raster and its geometry.

Example::

    python -m core segment --reference R.tif --reference-geometry ref.geojson \
        --targets A.tif B.tif --out out.gpkg [--format shp] [--model embedded] [--device auto]

K-shot: repeat ``--reference`` / ``--reference-geometry`` in pairs. ``--negative-geometry VECTOR[@RASTER]``
(repeatable) adds negative examples: every feature of VECTOR marks something that is NOT the class (typically
wrong polygons of an earlier result) on RASTER, or, without ``@RASTER``, on the target raster the geometries lie
on (the one whose extent they overlap most). They become a reference with background marks only. A feature of a geometry file whose
property ``role`` is ``background`` marks background; every other feature marks the class (polygons are
drawn masks, lines are scribbles). ``--params run.json`` replays a run from the JSON written beside its output
(``--cluster`` may move it onto a Dask cluster: ``--cluster local:2`` or ``--cluster tcp://HOST:8786``).

Exit codes: 0 done, 1 unexpected failure, 2 a problem with the input (one sentence on stderr), 130 cancelled.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .errors import InputError
from .params import (DECODINGS, DEFAULT_TUNE_STEPS, ENCODER_BACKENDS, KSHOTS, MODES, TUNE_FILES, ClassSpec, ModelParams,
                     ReferenceSpec, RunParams)


def add_arguments(p) -> None:
    p.add_argument("--reference", action="append", default=[], metavar="RASTER",
                   help="reference raster (repeat for K-shot, each with its --reference-geometry)")
    p.add_argument("--reference-geometry", action="append", default=[], metavar="VECTOR",
                   help="GeoJSON/GeoPackage/Shapefile with the marked objects (polygons or scribble lines)")
    p.add_argument("--negative-geometry", action="append", default=[], metavar="VECTOR[@RASTER]",
                   help="things that are NOT the class on a raster (e.g. wrong polygons of a result): every "
                        "feature is a negative example; the raster is the target they lie on, or name it as "
                        "VECTOR@RASTER (repeatable)")
    p.add_argument("--classes", metavar="JSON",
                   help="several classes in one run: a JSON list of {\"name\": ..., \"references\": [{\"raster\": R, "
                        "\"geometry\": V}, ...], \"negatives\": [\"V[@R]\", ...]} (instead of --reference)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="several classes: keep polygons of different classes that overlap (default: the more "
                        "probable class keeps each pixel)")
    p.add_argument("--layer-per-class", action="store_true",
                   help="one layer per class and target (GeoPackage tables / Shapefiles named TARGET_CLASS) "
                        "instead of one layer per target with a class_name attribute")
    p.add_argument("--targets", nargs="+", default=[], metavar="RASTER", help="rasters to search")
    p.add_argument("--out", metavar="FILE", help="output .gpkg (default) or .shp")
    p.add_argument("--format", choices=("gpkg", "shp"), help="output format (default: from --out's suffix)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--class-name", default="object", help="name of the class (an attribute of every polygon)")
    p.add_argument("--model", default="embedded", choices=("embedded", "vit_t", "vit_b", "vit_l", "vit_h"))
    p.add_argument("--checkpoint", help="SAM checkpoint file for vit_t/vit_b/vit_l/vit_h")
    p.add_argument("--adapters", default="auto",
                   help="trained adapters: 'auto' (default: the shipped files, weighed by a check on the reference), "
                        "'default' (the main shipped file), 'none' (training-free), a .pt path, or several .pt paths "
                        "joined by commas (weighed as for auto)")
    p.add_argument("--mode", default="virefsam", choices=MODES)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--encoder-backend", default="auto", choices=ENCODER_BACKENDS,
                   help="what runs the plain image-encoder passes: auto (ONNX Runtime for the embedded model on "
                        "the CPU in fp32, else PyTorch), torch or onnxruntime")
    p.add_argument("--adapted-precision", default="int8", choices=("int8", "fp32"),
                   help="weights of the adapted (DTA) pass where it runs in ONNX Runtime: int8 (default, about 1.5x faster on a CPU, masks at IoU >= 0.99 with fp32) or fp32")
    p.add_argument("--decoding", default="local", choices=DECODINGS,
                   help="training-free mode: local (each candidate object decoded on a crop around it, default) "
                        "or exact (on the whole tile, as SAM does; about 8x slower decoding on a CPU)")
    p.add_argument("--tune-steps", type=int, default=DEFAULT_TUNE_STEPS,
                   help="trained mode: tune the VCP encoder on the references for this many steps before the "
                        f"targets (run-time tuning; 0 = off; default {DEFAULT_TUNE_STEPS})")
    p.add_argument("--tune-files", default=TUNE_FILES[0], choices=TUNE_FILES,
                   help="--tune-steps: vcp_alone (default: only adapters files without DTA, such as the shipped "
                        "objects file, when the check keeps them) or all (every file)")
    p.add_argument("--kshot", default="ensemble", choices=KSHOTS,
                   help="several references, trained mode: ensemble (default: each reference also decoded on its "
                        "own, the probabilities averaged with the joint decoding) or joint (all references "
                        "together only)")
    p.add_argument("--no-zoom-views", dest="zoom_views", action="store_false",
                   help="trained mode, one reference crop: do not also match it zoomed out and in (0.7x and 1.4x, "
                        "two more shots of the K-shot ensemble; on by default: +1.2 mIoU on held-out object "
                        "classes, about a quarter more time per tile)")
    p.add_argument("--no-exclude-found", dest="exclude_found", action="store_false",
                   help="trained mode: keep the objects the model finds in the reference crops beyond the marks in the "
                        "background prototypes (by default they are left out of it when they exceed the marked area: "
                        "an analyst marks a few of many objects, and an unmarked one is not background)")
    p.add_argument("--no-self-support", dest="self_support", action="store_false",
                   help="trained mode: decode each target tile from the reference alone (by default it is decoded "
                        "once more with its own confident objects beside the reference: targets unlike the "
                        "reference's scene gain, another city's buildings +0.03 to +0.05 IoU; about 5%% more time; "
                        "a reference of one crop only: several crops keep the K-shot ensemble's decoding)")
    p.add_argument("--bands", help="1-based bands to use as RGB, e.g. 4,3,2 (default: the first three)")
    p.add_argument("--scale", default="auto",
                   help="working resolution as a zoom of the reference raster's native one: auto (default: from "
                        "the marked objects' size) or a number such as 0.5 (half) or 1 (native)")
    p.add_argument("--tile-size", type=int, default=1024)
    p.add_argument("--overlap", type=int, default=128)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--min-area", type=float, default=16.0, help="smallest polygon kept, in pixels")
    p.add_argument("--min-object-share", type=float, default=0.05,
                   help="also drop polygons smaller than this share of the smallest marked object's area (default "
                        "0.05: specks; 0 keeps every polygon above --min-area)")
    p.add_argument("--simplify", type=float, default=1.0, help="simplification tolerance in pixels (0: off)")
    p.add_argument("--keep-holes", action="store_true", help="do not fill holes in polygons")
    p.add_argument("--no-resample", action="store_true",
                   help="do not resample targets to the reference's ground resolution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cluster", default="", metavar="local:N|tcp://HOST:PORT",
                   help="run the tiles on a Dask cluster: local:N (N worker processes here) or an existing "
                        "scheduler's address (default: in this process)")
    p.add_argument("--params", metavar="JSON", help="replay a run from its parameters file (other options ignored)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def read_geometries(path: str) -> Tuple[Tuple[str, ...], Tuple[str, ...], str]:
    """Read a vector file: (foreground WKTs, background WKTs, CRS as WKT or '').

    With GDAL's Python bindings (QGIS, Debian's python3-gdal) any format OGR reads; without them (a bare pip
    environment, e.g. a CUDA machine) GeoJSON only, read by :func:`read_geojson`."""
    if not Path(path).is_file():
        raise InputError(f"The reference geometry file {path} does not exist.")
    try:
        from osgeo import gdal, ogr
    except ImportError:
        if Path(path).suffix.lower() in (".geojson", ".json"):
            return read_geojson(path)
        raise InputError(f"{path} cannot be read without GDAL's Python bindings (osgeo): install them "
                         "(Debian: python3-gdal) or give the geometries as GeoJSON.") from None

    gdal.UseExceptions()
    try:
        ds = ogr.Open(str(path))
    except RuntimeError:
        ds = None
    if ds is None or ds.GetLayerCount() == 0:
        raise InputError(f"{path} is not a vector file that GDAL can read (use GeoJSON, GeoPackage or Shapefile).")
    fg: List[str] = []
    bg: List[str] = []
    crs = ""
    for i in range(ds.GetLayerCount()):
        layer = ds.GetLayer(i)
        srs = layer.GetSpatialRef()
        if srs is not None and not crs:
            crs = srs.ExportToWkt()
        names = [layer.GetLayerDefn().GetFieldDefn(k).GetName() for k in range(layer.GetLayerDefn().GetFieldCount())]
        for feat in layer:
            geom = feat.GetGeometryRef()
            if geom is None or geom.IsEmpty():
                continue
            role = str(feat.GetField("role")).lower() if "role" in names else ""
            (bg if role == "background" else fg).append(geom.ExportToWkt())
    return tuple(fg), tuple(bg), crs


def read_geojson(path: str) -> Tuple[Tuple[str, ...], Tuple[str, ...], str]:
    """:func:`read_geometries` for a GeoJSON file without GDAL: shapely reads the geometries, pyproj the CRS
    (the file's ``crs`` member, else GeoJSON's WGS 84 longitude/latitude)."""
    import json

    import pyproj
    from shapely.errors import ShapelyError
    from shapely.geometry import shape

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        feats = doc["features"] if doc.get("type") == "FeatureCollection" else [doc]
        crs_name = ((doc.get("crs") or {}).get("properties") or {}).get("name") or "OGC:CRS84"
        crs = pyproj.CRS.from_user_input(crs_name).to_wkt()
        fg: List[str] = []
        bg: List[str] = []
        for feat in feats:
            if not feat.get("geometry"):
                continue
            geom = shape(feat["geometry"])
            if geom.is_empty:
                continue
            role = str((feat.get("properties") or {}).get("role", "")).lower()
            (bg if role == "background" else fg).append(geom.wkt)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ShapelyError, pyproj.exceptions.CRSError):
        raise InputError(f"{path} is not a GeoJSON file that can be read without GDAL.") from None
    return tuple(fg), tuple(bg), crs


def _split_negative(arg: str) -> Tuple[str, Optional[str]]:
    """``VECTOR@RASTER`` -> (VECTOR, RASTER); ``VECTOR`` (or a path that itself holds an '@') -> (VECTOR, None)."""
    if "@" in arg:
        vec, raster = arg.rsplit("@", 1)
        if vec and raster and Path(vec).is_file():
            return vec, raster
    return arg, None


def _raster_under(wkts: Sequence[str], crs: str, targets: Sequence[str], vec: str, fix: str = "") -> str:
    """The target raster whose extent the geometries overlap most (their CRS: ``crs``, '' = the raster's)."""
    import numpy as np
    import rasterio
    from rasterio.warp import transform_bounds
    from shapely import wkt as shp_wkt
    from shapely.geometry import box

    bounds = np.asarray([shp_wkt.loads(w).bounds for w in wkts], float)
    x0, y0 = bounds[:, 0].min(), bounds[:, 1].min()
    x1, y1 = bounds[:, 2].max(), bounds[:, 3].max()
    best, best_area = None, 0.0
    for path in targets:
        try:
            with rasterio.open(path) as ds:
                b = (x0, y0, x1, y1)
                if crs and ds.crs is not None:
                    b = transform_bounds(crs, ds.crs, *b)
                geo, frame = box(*b), box(*ds.bounds)
        except Exception:  # noqa: BLE001 - an unreadable target or CRS is reported by the run itself
            continue
        if geo.intersects(frame):
            area = geo.intersection(frame).area
            if best is None or area > best_area:
                best, best_area = path, area
    if best is None:
        raise InputError(f"The negative geometries of {vec} lie on none of the target rasters; "
                         + (fix or f"name their raster as {vec}@RASTER."))
    return best


def negative_spec(arg: str, targets: Sequence[str], k: int) -> ReferenceSpec:
    """A negative reference (background marks only) from ``--negative-geometry VECTOR[@RASTER]``."""
    vec, raster = _split_negative(arg)
    fg, bg, crs = read_geometries(vec)
    return negative_reference(tuple(fg) + tuple(bg), crs, targets, k, vec, raster)


def negative_reference(wkts: Sequence[str], crs: str, targets: Sequence[str], k: int, what: str,
                       raster: Optional[str] = None, fix: str = "") -> ReferenceSpec:
    """A negative reference ``neg<k>`` from the geometries ``wkts`` of ``what`` (a file or layer name), on
    ``raster`` or, when None, on the target raster they overlap most (the CLI and Processing)."""
    wkts = tuple(wkts)
    if not wkts:
        raise InputError(f"{what} holds no geometry to use as negative examples.")
    if raster is None:
        raster = _raster_under(wkts, crs, targets, what, fix)
    return ReferenceSpec(raster=raster, foreground=(), background=wkts, crs=crs, ref_id=f"neg{k}")


def read_classes(path: str, targets: Sequence[str]) -> Tuple[ClassSpec, ...]:
    """A classes file (``--classes``): a JSON list of ``{"name", "references": [{"raster", "geometry"}],
    "negatives": ["VECTOR[@RASTER]"]}`` -> ClassSpecs (the references read as ``--reference-geometry``)."""
    import json

    try:
        items = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"Cannot read the classes file {path}: {exc.strerror}.") from None
    except ValueError as exc:
        raise InputError(f"The classes file {path} is not JSON ({exc}).") from None
    if not isinstance(items, list) or not items or not all(isinstance(c, dict) for c in items):
        raise InputError(f"The classes file {path} must hold a list of classes, each with a name and references.")
    out = []
    for c in items:
        name = str(c.get("name", "")).strip()
        refs = []
        for k, r in enumerate(c.get("references") or []):
            if not isinstance(r, dict) or "raster" not in r or "geometry" not in r:
                raise InputError(f"Each reference of class '{name}' in {path} needs a raster and a geometry file.")
            fg, bg, crs = read_geometries(str(r["geometry"]))
            refs.append(ReferenceSpec(raster=str(r["raster"]), foreground=fg, background=bg, crs=crs,
                                      ref_id=f"{name}_ref{k + 1}"))
        for k, arg in enumerate(c.get("negatives") or []):
            refs.append(dataclasses.replace(negative_spec(str(arg), targets, k + 1), ref_id=f"{name}_neg{k + 1}"))
        out.append(ClassSpec(name, tuple(refs)))
    return tuple(out)


def params_from_args(args) -> RunParams:
    if args.params:
        try:
            text = Path(args.params).read_text()
        except OSError as exc:
            raise InputError(f"Cannot read the parameters file {args.params}: {exc.strerror}.") from None
        try:
            params = RunParams.from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{args.params} is not a ViRefSAM parameters file ({exc}).") from None
        if getattr(args, "cluster", ""):  # the same run elsewhere: --cluster overrides the file's

            params = dataclasses.replace(params, cluster=args.cluster)
        return params
    classes = read_classes(args.classes, args.targets) if getattr(args, "classes", None) else ()
    if not args.reference and not classes:
        raise InputError("Give a reference raster with --reference and its objects with --reference-geometry.")
    if len(args.reference) != len(args.reference_geometry):
        raise InputError("Give one --reference-geometry for each --reference (they go in pairs).")
    refs = []
    for k, (raster, vec) in enumerate(zip(args.reference, args.reference_geometry)):
        fg, bg, crs = read_geometries(vec)
        refs.append(ReferenceSpec(raster=raster, foreground=fg, background=bg, crs=crs, ref_id=f"ref{k + 1}"))
    for k, arg in enumerate(getattr(args, "negative_geometry", None) or []):
        refs.append(negative_spec(arg, args.targets, k + 1))
    fmt = args.format or ("shp" if args.out and args.out.lower().endswith(".shp") else "gpkg")
    bands = None
    if args.bands:
        try:
            bands = tuple(int(b) for b in args.bands.split(","))
        except ValueError:
            raise InputError("--bands takes 1-based band numbers separated by commas, e.g. 4,3,2.") from None
    adapters = None if args.adapters.lower() == "none" else args.adapters
    return RunParams(
        class_name="+".join(c.name for c in classes) if classes and args.class_name == "object" else args.class_name,
        classes=classes,
        allow_overlap=bool(getattr(args, "allow_overlap", False)),
        layer_per_class=bool(getattr(args, "layer_per_class", False)),
        references=tuple(refs),
        targets=tuple(args.targets),
        output=args.out,
        output_format=fmt,
        overwrite=args.overwrite,
        model=ModelParams(name=args.model, checkpoint=args.checkpoint, adapters=adapters, device=args.device,
                          precision=args.precision, threads=args.threads,
                          encoder_backend=getattr(args, "encoder_backend", "auto"),
                          adapted_precision=getattr(args, "adapted_precision", "int8")),
        mode=args.mode,
        bands=bands,
        tile_size=args.tile_size,
        overlap=args.overlap,
        threshold=args.threshold,
        min_area=args.min_area, min_object_share=args.min_object_share,
        simplify=args.simplify,
        fill_holes=not args.keep_holes,
        decoding=getattr(args, "decoding", "local"),
        kshot=getattr(args, "kshot", "ensemble"),
        tune_steps=getattr(args, "tune_steps", DEFAULT_TUNE_STEPS),
        tune_files=getattr(args, "tune_files", TUNE_FILES[0]),
        zoom_views=getattr(args, "zoom_views", True),
        exclude_found=getattr(args, "exclude_found", True),
        self_support=getattr(args, "self_support", True),
        scale=str(getattr(args, "scale", "auto")),
        match_resolution=not args.no_resample,
        seed=args.seed,
        cluster=getattr(args, "cluster", "") or "",
    )


class _Progress:
    """A tqdm bar on stderr driven by the pipeline's progress(fraction, message) callback."""

    def __init__(self, quiet: bool) -> None:
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=1000, file=sys.stderr, unit="‰", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def __call__(self, fraction: float, message: str = "") -> None:
        if self.bar is None:
            return
        self.bar.n = int(round(1000 * min(max(fraction, 0.0), 1.0)))
        self.bar.set_postfix_str(message[:60], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args) -> int:
    from .pipeline import run as run_pipeline

    params = params_from_args(args)
    if not params.output:
        raise InputError("Give an output file with --out (a .gpkg or .shp).")
    progress = _Progress(args.quiet)
    t0 = time.perf_counter()
    try:
        result = run_pipeline(params, progress=progress)
    finally:
        progress.close()
    for t in result.targets:
        name = Path(t.raster).name
        if t.skipped:
            print(f"{name}: skipped ({t.skipped})")
        else:
            print(f"{name}: {t.n_objects} objects in {t.seconds:.1f} s")
    print(f"Wrote {result.output} ({sum(t.n_objects for t in result.targets)} polygons, "
          f"{time.perf_counter() - t0:.1f} s).")
    if result.scale:
        print(result.scale)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
