"""Writing the polygons found to GeoPackage (default) or ESRI Shapefile with GDAL/OGR.

Layout:

* GeoPackage: one file, one layer per target raster, named after the raster's file stem (sanitised to letters,
  digits and ``_``; ``_2``, ``_3`` ... appended when two rasters share a stem). Each layer is in its raster's CRS.
* A layer without CRS (a raster without georeferencing: pixel coordinates) is written with GeoPackage's
  "Undefined Cartesian SRS", or without ``.prj`` in a Shapefile.
* Shapefile: a shapefile holds a single layer in a single CRS, so there is one shapefile per target raster. With
  one target the file is exactly ``path``; with several, ``<stem>_<layer name>.shp`` next to ``path``.

Attributes are ``core.results.FIELDS`` (names of at most 10 characters, so Shapefile keeps them). Geometries are
Polygons; a MultiPolygon is written as one feature per part. Shapefiles are written UTF-8 (with a ``.cpg``).

Safety: everything is written under temporary names in the destination folder
(``.<name>.tmp-<pid>-<random>...``, unique per run and per call) and moved into place only when complete. An
existing output is refused (InputError) unless ``overwrite=True``; an exception or a cancellation while writing
(a feature generator that raises, disk full, ``is_cancelled()``) removes the temporary files and leaves any
existing output untouched.

Two runs writing the same output at once (scripts; the dock refuses a second run) both pass the "exists
already" check at their start. What happens when they finish:

* without ``overwrite``: the output is claimed atomically with a hard link, which fails when the name exists.
  The first run to finish keeps its file; the second one refuses (InputError "... was written by another run
  while this one was working ...") and removes its own temporary files, never touching the first run's file.
  (On a file system without hard links: check, then an atomic rename; the window is a few microseconds.)
* with ``overwrite``: each run's file is moved in with an atomic rename; the later rename wins, and the
  output is always one run's complete file. A shapefile is several files: its set is moved under a lock file
  (``.<name>.shp.lock``), so the ``.shp`` of one run never ends up with the ``.dbf`` of the other.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from osgeo import ogr, osr

from .errors import CancelledError, InputError
from .results import FIELDS, Feature

SHP_SIDECARS = (".shp", ".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx", ".qmd")
_DRIVERS = {"gpkg": "GPKG", "shp": "ESRI Shapefile"}
_EXT = {"gpkg": ".gpkg", "shp": ".shp"}



@contextlib.contextmanager
def _ogr_exceptions():
    """GDAL/OGR exceptions on inside the block only (QGIS and other plugins share the process-wide setting)."""
    was_ogr, was_osr = ogr.GetUseExceptions(), osr.GetUseExceptions()
    ogr.UseExceptions()
    osr.UseExceptions()
    try:
        yield
    finally:
        # GDAL keeps a stack of error handlers: undo in reverse order
        if not was_osr:
            osr.DontUseExceptions()
        if not was_ogr:
            ogr.DontUseExceptions()


@dataclass
class LayerData:
    """One layer to write: ``name`` (unsanitised is fine), ``crs_wkt`` ("" = no CRS), ``features`` (any iterable
    of :class:`core.results.Feature`, geometries shapely Polygons in that CRS; a generator is consumed once)."""

    name: str
    crs_wkt: str
    features: Iterable[Feature]


def layer_name(path_or_name: str) -> str:
    """A layer name from a raster path: the file stem, letters/digits/underscores only, never empty."""
    stem = os.path.splitext(os.path.basename(str(path_or_name).rstrip("/\\")))[0]
    name = re.sub(r"[^0-9A-Za-z_]+", "_", stem).strip("_")
    return name or "layer"


def layer_names(rasters: Sequence[str], classes: Optional[Sequence[str]] = None) -> List[str]:
    """The (unsanitised) layer names of a run's output, in order: one per target raster (its path), or with
    ``classes`` (one layer per class, ``RunParams.layer_per_class``) one per target and class,
    ``<target stem>_<class>``, every class of the first target first."""
    if not classes:
        return [str(r) for r in rasters]
    return [f"{layer_name(r)}_{re.sub(r'[^0-9A-Za-z_]+', '_', c).strip('_') or 'class'}"
            for r in rasters for c in classes]


def split_by_class(results: Sequence, classes: Sequence[str]) -> List[Tuple[str, object]]:
    """(class, a copy of the ``core.results.TargetResult`` holding only that class's polygons) for every target
    and class, in the order of :func:`layer_names`."""
    import dataclasses

    return [(c, dataclasses.replace(r, features=[f for f in r.features if f.attributes.get("class_name") == c]))
            for r in results for c in classes]


def unique_layer_names(names: Sequence[str]) -> List[str]:
    """The layer names :func:`write_layers` gives ``names`` (sanitised; repeats get _2, _3, ...)."""
    return _unique_names(names)


def _unique_names(names: Sequence[str]) -> List[str]:
    seen: dict = {}
    out = []
    for n in names:
        base = layer_name(n)
        k = seen.get(base.lower(), 0) + 1
        seen[base.lower()] = k
        out.append(base if k == 1 else f"{base}_{k}")
    return out


def _resolve_format(path: str, fmt: Optional[str]) -> Tuple[str, str]:
    ext = os.path.splitext(path)[1].lower()
    by_ext = {".gpkg": "gpkg", ".shp": "shp"}.get(ext)
    if fmt is None:
        fmt = by_ext or "gpkg"
    fmt = fmt.lower()
    if fmt not in _DRIVERS:
        raise InputError(f"Unknown output format '{fmt}': choose gpkg or shp.")
    if by_ext is None:
        if ext:
            raise InputError(
                f"The output '{os.path.basename(path)}' must end in {_EXT[fmt]} for the {fmt} format."
            )
        path = path + _EXT[fmt]
    elif by_ext != fmt:
        raise InputError(f"The output '{os.path.basename(path)}' does not match the {fmt} format.")
    return path, fmt


def output_paths(path: str, layer_names: Sequence[str], fmt: Optional[str] = None) -> List[str]:
    """The file(s) :func:`write_layers` will write for these layers (one gpkg, or one shp per layer)."""
    path, fmt = _resolve_format(str(path), fmt)
    if fmt == "gpkg" or len(layer_names) <= 1:
        return [path]
    stem = os.path.splitext(path)[0]
    return [f"{stem}_{n}.shp" for n in _unique_names(layer_names)]


def _check_folder(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"The output folder '{folder}' does not exist.")
    if not os.access(folder, os.W_OK):
        raise InputError(f"The output folder '{folder}' is not writable; choose another folder.")


def _srs(crs_wkt: str) -> Optional[osr.SpatialReference]:
    if not crs_wkt:
        return None
    srs = osr.SpatialReference()
    try:
        srs.ImportFromWkt(crs_wkt)
    except RuntimeError:
        srs.SetFromUserInput(crs_wkt)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return srs


def _create_layer(ds, name: str, crs_wkt: str, fmt: str):
    opts = ["ENCODING=UTF-8"] if fmt == "shp" else ["GEOMETRY_NAME=geom", "FID=fid", "SPATIAL_INDEX=YES"]
    srs = _srs(crs_wkt)
    if srs is None and fmt == "gpkg":  # pixel coordinates: GeoPackage's "Undefined Cartesian SRS" (srs_id -1),
        srs = osr.SpatialReference()  # not the "Undefined geographic SRS" it would choose by itself
        srs.SetLocalCS("Undefined Cartesian SRS")
    lyr = ds.CreateLayer(name, srs=srs, geom_type=ogr.wkbPolygon, options=opts)
    for fname, ftype in FIELDS:
        if ftype is float:
            fd = ogr.FieldDefn(fname, ogr.OFTReal)
        elif ftype is int:
            fd = ogr.FieldDefn(fname, ogr.OFTInteger64)
        else:
            fd = ogr.FieldDefn(fname, ogr.OFTString)
            if fmt == "shp":
                fd.SetWidth(254)
        lyr.CreateField(fd)
    return lyr


def _write_features(lyr, features: Iterable[Feature], is_cancelled) -> int:
    defn = lyr.GetLayerDefn()
    n = 0
    for k, feat in enumerate(features):
        if is_cancelled is not None and k % 256 == 0 and is_cancelled():
            raise CancelledError()
        geom = feat.geometry
        parts = list(geom.geoms) if geom.geom_type == "MultiPolygon" else [geom]
        for part in parts:
            if part.is_empty or part.geom_type != "Polygon":
                continue
            f = ogr.Feature(defn)
            for fname, ftype in FIELDS:
                v = feat.attributes.get(fname)
                if v is None:
                    continue
                f.SetField(fname, float(v) if ftype is float else (int(v) if ftype is int else str(v)))
            f.SetGeometry(ogr.CreateGeometryFromWkb(bytes(part.wkb)))
            lyr.CreateFeature(f)
            n += 1
    return n


def _tmp_name(final: str) -> str:
    """A name in the folder of ``final`` that no other run (process or thread) uses: pid + random suffix."""
    folder, base = os.path.split(os.path.abspath(final))
    stem, ext = os.path.splitext(base)
    return os.path.join(folder, f".{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}{ext}")


class _Taken(Exception):
    """The final name was taken by another run between the start of this one and its end."""


def _taken_error(final: str) -> InputError:
    return InputError(
        f"The output '{os.path.basename(final)}' was written by another run while this one was working; this run's "
        "result was not kept (the other run's file is untouched): choose another name or allow overwriting."
    )


def _claim(tmp: str, final: str) -> None:
    """Move the complete file ``tmp`` to ``final`` only if ``final`` does not exist, atomically.

    A hard link fails with FileExistsError when ``final`` exists (checked and done in one step by the file
    system), so of two runs finishing at once exactly one gets the name; the other raises :class:`_Taken`."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise _Taken(final) from None
    except OSError:  # no hard links here (FAT, some network shares): check, then an atomic rename
        if os.path.lexists(final):
            raise _Taken(final) from None
        os.replace(tmp, final)
        return
    os.remove(tmp)


@contextlib.contextmanager
def _lock(final: str, timeout: float = 60.0, stale: float = 120.0):
    """An exclusive lock file beside ``final`` for moving a set of files (a shapefile) into place.

    Created with O_EXCL, so one run at a time holds it; a lock older than ``stale`` seconds (a killed run) is
    broken."""
    folder, base = os.path.split(os.path.abspath(final))
    path = os.path.join(folder, f".{base}.lock")
    t0 = time.monotonic()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                if time.time() - os.path.getmtime(path) > stale:
                    os.remove(path)
                    continue
            except OSError:
                continue  # released meanwhile
            if time.monotonic() - t0 > timeout:
                raise InputError(
                    f"The output '{base}' is being written by another run; wait for it to finish and try again."
                ) from None
            time.sleep(0.02)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        _remove([path])


def _remove(paths: Iterable[str]) -> None:
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
        except OSError:  # pragma: no cover
            pass


def _siblings(path: str, fmt: str) -> List[str]:
    if fmt == "shp":
        stem = os.path.splitext(path)[0]
        return [stem + e for e in SHP_SIDECARS]
    return [path, path + "-journal", path + "-wal", path + "-shm"]


def write_layers(
    path: str,
    layers: Sequence[LayerData],
    fmt: Optional[str] = None,
    overwrite: bool = False,
    is_cancelled: Optional[Callable[[], bool]] = None,
) -> List[str]:
    """Write ``layers`` to ``path`` and return the file(s) written (see the module docstring for the layout).

    fmt: "gpkg" or "shp"; None = from the extension of ``path`` (default gpkg). An extension is added when
    ``path`` has none. Raises InputError (existing output without ``overwrite``, missing or unwritable
    folder, wrong extension) and CancelledError; in both cases, and on any other error, nothing is left behind.
    """
    if not layers:
        raise InputError("There is nothing to write: no target raster was processed.")
    path, fmt = _resolve_format(str(path), fmt)
    names = _unique_names([ly.name for ly in layers])
    finals = output_paths(path, [ly.name for ly in layers], fmt)
    _check_folder(path)
    for f in finals:
        if os.path.exists(f) and not overwrite:
            raise InputError(
                f"The output '{os.path.basename(f)}' already exists; choose another name or allow overwriting."
            )
    with _ogr_exceptions():
        return _write(fmt, names, layers, finals, overwrite, is_cancelled)


def _write(fmt, names, layers, finals, overwrite, is_cancelled) -> List[str]:
    driver = ogr.GetDriverByName(_DRIVERS[fmt])
    temps = [_tmp_name(f) for f in finals]
    created: List[str] = []
    try:
        if fmt == "gpkg":
            groups = [(temps[0], list(zip(names, layers)))]
        else:
            groups = [(t, [(n, ly)]) for t, n, ly in zip(temps, names, layers)]
        for tmp, items in groups:
            created.extend(_siblings(tmp, fmt))
            try:
                ds = driver.CreateDataSource(tmp)
            except RuntimeError as e:
                raise InputError(
                    f"Cannot write in the folder '{os.path.dirname(os.path.abspath(tmp))}' ({e})."
                ) from None
            if ds is None:  # pragma: no cover - exceptions are on
                raise InputError(f"Cannot write in the folder '{os.path.dirname(os.path.abspath(tmp))}'.")
            lyr = None
            try:
                for name, ly in items:
                    lyr = _create_layer(ds, name, ly.crs_wkt, fmt)
                    lyr.StartTransaction()
                    _write_features(lyr, ly.features, is_cancelled)
                    lyr.CommitTransaction()
            finally:
                lyr = None  # drop every reference so that the file is closed (flushed) before the rename
                ds = None
        if is_cancelled is not None and is_cancelled():
            raise CancelledError()
        # all complete: move into place
        placed: List[str] = []
        try:
            for tmp, final in zip(temps, finals):
                if fmt == "gpkg":
                    if overwrite:
                        os.replace(tmp, final)
                    else:
                        _claim(tmp, final)
                    placed.append(final)
                else:
                    with _lock(final):
                        _place_shapefile(tmp, final, overwrite)
                    placed.append(final)
        except _Taken as taken:
            for final in placed:  # this run's files, placed a moment ago: the run is refused as a whole
                _remove(_siblings(final, fmt))
            raise _taken_error(str(taken)) from None
        return finals
    except BaseException:
        _remove(created)
        raise


def _place_shapefile(tmp: str, final: str, overwrite: bool) -> None:
    """Move the sidecars of the shapefile ``tmp`` to those of ``final`` (under the lock of ``final``).

    Without ``overwrite`` the ``.shp`` is claimed first (:func:`_claim`); a sidecar of ``final`` that this run
    does not write (a stale ``.prj`` of a deleted shapefile) is removed, so the set is this run's only."""
    tstem, fstem = os.path.splitext(tmp)[0], os.path.splitext(final)[0]
    if overwrite:
        _remove(_siblings(final, "shp"))
        os.replace(tstem + ".shp", fstem + ".shp")
    else:
        _claim(tstem + ".shp", fstem + ".shp")
    for e in SHP_SIDECARS:
        if e == ".shp":
            continue
        if os.path.exists(tstem + e):
            os.replace(tstem + e, fstem + e)
        else:
            _remove([fstem + e])


def write_results(
    path: str,
    results: Sequence,
    fmt: Optional[str] = None,
    overwrite: bool = False,
    is_cancelled: Optional[Callable[[], bool]] = None,
    classes: Optional[Sequence[str]] = None,
) -> List[str]:
    """Write ``core.results.TargetResult`` objects (skipped ones included, as empty layers) via :func:`write_layers`.

    Layer names come from each result's raster path; with ``classes`` (one layer per class) one layer per result
    and class, named by :func:`layer_names`."""
    if classes:
        names = layer_names([r.raster for r in results], classes)
        layers = [LayerData(n, r.crs_wkt, r.features) for n, (_, r) in zip(names, split_by_class(results, classes))]
    else:
        layers = [LayerData(r.raster, r.crs_wkt, r.features) for r in results]
    return write_layers(path, layers, fmt=fmt, overwrite=overwrite, is_cancelled=is_cancelled)
