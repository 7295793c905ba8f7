"""The bench's inputs: VRT crops / mosaics of the real target, the reference, a real 1024x1024 tile and its truth."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np


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
    from ..params import ReferenceSpec
    from ..segment_cli import read_geometries

    fg, bg, crs = read_geometries(geometry)
    return ReferenceSpec(raster=str(raster), foreground=fg, background=bg, crs=crs, ref_id="ref1")


def real_tile(target: str, truth: Optional[str], size: int = 1024):
    """The central ``size`` x ``size`` window of ``target`` as RGB uint8, and the truth mask there (or None)."""
    from rasterio.windows import Window

    from ..raster import RasterSource

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


def _pixels(path: str) -> Tuple[int, int]:
    import rasterio

    with rasterio.open(path) as ds:
        return ds.width, ds.height
