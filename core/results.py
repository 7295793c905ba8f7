"""What a run returns: per target raster, the polygons found and their attributes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .params import RunParams

# Attribute names and types of every output feature (GeoPackage, Shapefile and QGIS memory layers alike;
# Shapefile limits names to 10 characters, so these stay short).
FIELDS = (
    ("class_name", str),
    ("score", float),  # mean probability inside the polygon
    ("area", float),  # in area_unit
    ("area_unit", str),  # "m2" when the CRS allows, else "map_units2" / "px2"
    ("source", str),  # path of the target raster
    ("ref_id", str),  # the reference set's id(s)
    ("model", str),  # model name (+ "+adapters" when trained adapters were used)
)


@dataclass
class Feature:
    """One polygon in the target raster's CRS (a shapely Polygon) and its attributes (keys of FIELDS)."""

    geometry: Any
    attributes: Dict[str, Any]


@dataclass
class TargetResult:
    raster: str
    crs_wkt: str
    features: List[Feature] = field(default_factory=list)
    seconds: float = 0.0
    skipped: Optional[str] = None  # why the raster was skipped (all nodata, ...), None when it was processed
    tiles: int = 0  # tiles of its grid at the working scale (core.tiling.TileGrid), all-nodata ones included

    @property
    def n_objects(self) -> int:
        return len(self.features)


@dataclass
class RunResult:
    params: RunParams
    targets: List[TargetResult] = field(default_factory=list)
    output: Optional[str] = None  # the written file, when params.output was given
    seconds: float = 0.0
    timings: Dict[str, float] = field(default_factory=dict)  # seconds per stage: read, encoder, vcp, ...
    notes: List[str] = field(default_factory=list)  # sentences the user should read (e.g. a fallback to the CPU)
    scale: str = ""  # the working scale and the number of reference crops, one sentence (core.scale)

    def summary(self) -> str:
        parts = [f"{t.n_objects} in {t.raster.rsplit('/', 1)[-1]}" for t in self.targets if t.skipped is None]
        skipped = [t for t in self.targets if t.skipped]
        text = f"{self.params.class_name}: " + (", ".join(parts) or "no raster processed")
        if skipped:
            text += f"; {len(skipped)} skipped"
        text += f" ({self.seconds:.1f} s)."
        return " ".join([text, *([self.scale] if self.scale else []), *self.notes])
