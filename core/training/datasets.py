"""Few-shot segmentation datasets: folders of images + class-id masks, class tables and class folds.

A :class:`SegDataset` is a list of (image, mask) files with a class table. Masks hold one class id per pixel
(binary 0/1 masks are read as "class 1"); some ids are *ignore* ids (unlabelled pixels) that count neither as
foreground nor as background in the metrics. Images are read as ``HxWx3 uint8`` (1-band rasters are
replicated, non-8-bit rasters are stretched 2-98 %), masks as ``bool`` for the class of an episode
(:mod:`.episodes` draws the episodes).

Datasets under ``../shared/data`` (see each folder's README.txt; research-only data is read in place, never
copied into the repository):

=====================  ====================================================================  =========
name                   classes (id: name)                                                    folds
=====================  ====================================================================  =========
``nwpu_vhr10_dev``     4 baseball_diamond, 5 tennis_court, 6 basketball_court,               3 x 2
                       7 ground_track_field, 8 harbor, 9 bridge (0 = background)
``dubai_landcover``    1 building, 2 land, 3 road, 4 vegetation, 5 water (0 = unlabelled:    none
                       ignored)
``oam_buildings``      1 building (binary GeoTIFF masks)                                     none
``spacenet_atlanta``   1 building (3x3 tiles of one panchromatic chip)                       none
``swiss_trees``        1 tree (4 tiny tiles: a smoke test, not a benchmark)                  none
=====================  ====================================================================  =========

Folds of ``nwpu_vhr10_dev`` (3 folds of 2 consecutive class ids, so that training sees 4 base classes, as
many as possible, and every class is novel in exactly one fold):

* fold 0: novel = baseball_diamond (4), tennis_court (5);      base = 6, 7, 8, 9
* fold 1: novel = basketball_court (6), ground_track_field (7); base = 4, 5, 8, 9
* fold 2: novel = harbor (8), bridge (9);                       base = 4, 5, 6, 7

Datasets without folds are evaluated on all their classes; training uses them beside a folded dataset
(``train --also``: all their classes, or the named ones, join the base classes; see
:func:`iter_mixed_episodes`).

Any other folder (``kind="folder"``): ``index.csv`` with columns ``image``, ``mask`` (relative paths) and
``classes.json`` = ``{"classes": {"1": "name", ...}, "folds": [[1], [2]], "ignore": [255], "min_pixels": 1024}``
(only ``classes`` is required).

Public benchmarks a user may own (not in the repository, not downloaded by it):

**iSAID-5i** (``open_dataset(path, kind="isaid", split="val")``): 15 classes, 3 folds of 5 consecutive ids
(fold 0: 1 ship, 2 storage_tank, 3 baseball_diamond, 4 tennis_court, 5 basketball_court; fold 1:
6 ground_track_field, 7 bridge, 8 large_vehicle, 9 small_vehicle, 10 helicopter; fold 2: 11 swimming_pool,
12 roundabout, 13 soccer_ball_field, 14 plane, 15 harbor); train on the ``train`` split's base classes, test
on 1,000 episodes per fold from the ``val`` split (``sample_episodes(..., per_class=False)``). Layout (the
896x896 patches used by the FSS literature)::

    ROOT/train/images/P0002_0_896_0_896.png
    ROOT/train/semantic_png/P0002_0_896_0_896_instance_color_RGB.png   (or P0002_..._896.png)
    ROOT/val/images/...            ROOT/val/semantic_png/...

Masks are either class-id PNGs (0 = background, 255 = ignore) or iSAID's RGB colour masks (the iSAID
palette is mapped to ids).

**LoveDA-2i** (``kind="loveda"``): LoveDA's 6 foreground classes in 2 folds of 3 (fold 0: 2 building,
3 road, 4 water; fold 1: 5 barren, 6 forest, 7 agriculture; 1 = background, 0 = no-data is ignored). The
split of the ViRefSAM paper was not available to check; this one follows the class order, change it with
``folds=``. Train on ``Train``, test on ``Val``. Layout (LoveDA as distributed)::

    ROOT/Train/Urban/images_png/N.png   ROOT/Train/Urban/masks_png/N.png   (and Rural/)
    ROOT/Val/Urban/images_png/N.png     ROOT/Val/Urban/masks_png/N.png     (and Rural/)
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from ..paths import cache_dir

NWPU_FOLDS: Tuple[Tuple[int, ...], ...] = ((4, 5), (6, 7), (8, 9))
ISAID_FOLDS: Tuple[Tuple[int, ...], ...] = ((1, 2, 3, 4, 5), (6, 7, 8, 9, 10), (11, 12, 13, 14, 15))
LOVEDA_FOLDS: Tuple[Tuple[int, ...], ...] = ((2, 3, 4), (5, 6, 7))

ISAID_CLASSES = {
    1: "ship", 2: "storage_tank", 3: "baseball_diamond", 4: "tennis_court", 5: "basketball_court",
    6: "ground_track_field", 7: "bridge", 8: "large_vehicle", 9: "small_vehicle", 10: "helicopter",
    11: "swimming_pool", 12: "roundabout", 13: "soccer_ball_field", 14: "plane", 15: "harbor",
}
# iSAID's colour masks: RGB of class ids 0..15
ISAID_PALETTE = (
    (0, 0, 0), (0, 0, 63), (0, 63, 63), (0, 63, 0), (0, 63, 127), (0, 63, 191), (0, 63, 255), (0, 127, 63),
    (0, 127, 127), (0, 0, 127), (0, 0, 191), (0, 0, 255), (0, 191, 127), (0, 127, 191), (0, 127, 255),
    (0, 100, 155),
)
LOVEDA_CLASSES = {2: "building", 3: "road", 4: "water", 5: "barren", 6: "forest", 7: "agriculture"}
DUBAI_CLASSES = {1: "building", 2: "land", 3: "road", 4: "vegetation", 5: "water"}
NWPU_CLASSES = {4: "baseball_diamond", 5: "tennis_court", 6: "basketball_court", 7: "ground_track_field",
                8: "harbor", 9: "bridge"}

IGNORE = 255  # label value of ignored pixels after reading


# ----------------------------------------------------------------------------------------------------------------
# reading files

def read_image(path) -> np.ndarray:
    """Any image or raster -> ``HxWx3 uint8`` (1 band replicated, >3 bands: the first 3, non-8-bit stretched)."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import rasterio

        with rasterio.open(path) as src:
            arr = src.read()
            nodata = src.nodata
        if arr.shape[0] == 1:
            arr = np.repeat(arr, 3, axis=0)
        arr = arr[:3]
        if arr.dtype != np.uint8:
            arr = _stretch(arr, nodata)
        return np.ascontiguousarray(arr.transpose(1, 2, 0))
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _stretch(arr: np.ndarray, nodata) -> np.ndarray:
    out = np.zeros(arr.shape, np.uint8)
    for b in range(arr.shape[0]):
        band = arr[b].astype(np.float64)
        valid = np.isfinite(band) if nodata is None else (band != nodata) & np.isfinite(band)
        if not valid.any():
            continue
        lo, hi = np.percentile(band[valid], [2, 98])
        scaled = (band - lo) / max(hi - lo, 1e-9) * 255.0
        out[b] = np.where(valid, np.clip(np.round(scaled), 0, 255), 0).astype(np.uint8)
    return out


def read_label(path, palette: Optional[Sequence[Tuple[int, int, int]]] = None) -> np.ndarray:
    """A class-id mask (PNG, palette PNG or 1-band GeoTIFF) -> ``HxW uint8``; RGB masks need ``palette``."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import rasterio

        with rasterio.open(path) as src:
            arr = src.read(1)
    else:
        from PIL import Image

        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA"):
                rgb = np.asarray(im.convert("RGB"))
                if palette is None:
                    raise InputError(f"The mask {path.name} is an RGB image; this dataset expects class-id masks.")
                return _rgb_to_ids(rgb, palette)
            arr = np.asarray(im)
    if arr.ndim != 2:
        raise InputError(f"The mask {path.name} has {arr.ndim} dimensions; expected one band of class ids.")
    if arr.dtype != np.uint8:
        if arr.max(initial=0) > 255 or arr.min(initial=0) < 0:
            raise InputError(f"The mask {path.name} has class ids outside 0..255.")
        arr = arr.astype(np.uint8)
    return arr


def _rgb_to_ids(rgb: np.ndarray, palette) -> np.ndarray:
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    out = np.full(code.shape, IGNORE, np.uint8)
    for cid, (r, g, b) in enumerate(palette):
        out[code == ((r << 16) | (g << 8) | b)] = cid
    return out


# ----------------------------------------------------------------------------------------------------------------
# datasets

@dataclass(frozen=True)
class Item:
    key: str     # the image path relative to the dataset root: unique, stable, used in episode files
    image: Path
    mask: Path
    group: Optional[str] = None  # images of one group never pair as support and query (None: its own group)


class SegDataset:
    """Images + class-id masks with a class table, ignore ids and (optionally) class folds."""

    def __init__(self, name: str, root, items: Sequence[Item], classes: Mapping[int, str],
                 ignore_ids: Sequence[int] = (), value_map: Optional[Mapping[int, int]] = None,
                 folds: Optional[Sequence[Sequence[int]]] = None, palette=None, min_pixels: int = 1024,
                 note: str = "") -> None:
        if not items:
            raise InputError(f"The dataset {name} at {root} has no images.")
        self.name = name
        self.root = Path(root)
        self.items: List[Item] = list(items)
        self.classes: Dict[int, str] = dict(sorted(classes.items()))
        self.ignore_ids = tuple(ignore_ids)
        self.value_map = dict(value_map or {})
        self.folds = tuple(tuple(f) for f in folds) if folds else None
        self.palette = palette
        self.min_pixels = int(min_pixels)
        self.note = note
        self._counts: Optional[np.ndarray] = None
        self._groups: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"SegDataset({self.name!r}, {len(self)} images, classes={self.classes})"

    # --- reading ---------------------------------------------------------------------------------------------
    def image(self, i: int) -> np.ndarray:
        return read_image(self.items[i].image)

    def label(self, i: int) -> np.ndarray:
        """Class ids ``HxW uint8``; ignored pixels are :data:`IGNORE` (255)."""
        lab = read_label(self.items[i].mask, self.palette)
        if self.value_map:
            lut = np.arange(256, dtype=np.uint8)
            for src, dst in self.value_map.items():
                lut[src] = dst
            lab = lut[lab]
        if self.ignore_ids:
            lab = np.where(np.isin(lab, self.ignore_ids), np.uint8(IGNORE), lab)
        return lab

    def class_mask(self, i: int, class_id: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """(mask of ``class_id`` as bool, ignore mask as bool or ``None`` where nothing is ignored)."""
        lab = self.label(i)
        ignore = lab == IGNORE
        return lab == class_id, (ignore if ignore.any() else None)

    # --- class statistics ------------------------------------------------------------------------------------
    def class_name(self, class_id: int) -> str:
        return self.classes[class_id]

    def class_id(self, name_or_id) -> int:
        if isinstance(name_or_id, (int, np.integer)) or str(name_or_id).isdigit():
            cid = int(name_or_id)
            if cid in self.classes:
                return cid
        for cid, name in self.classes.items():
            if name == str(name_or_id):
                return cid
        raise InputError(f"The dataset {self.name} has no class '{name_or_id}'; its classes are "
                         f"{', '.join(self.classes.values())}.")

    def pixel_counts(self) -> np.ndarray:
        """``[n_images, n_classes]`` pixel counts per class (columns in the order of :attr:`classes`).

        Read once from the masks and cached in ``cache_dir()/episode_index`` (keyed by the mask files'
        paths, sizes and modification times, so an edited mask is counted again).
        """
        if self._counts is not None:
            return self._counts
        ids = list(self.classes)
        h = hashlib.sha1(repr((self.name, str(self.root), ids, self.ignore_ids, sorted(self.value_map.items())))
                         .encode())
        for it in self.items:
            st = it.mask.stat()
            h.update(f"{it.key}|{it.mask}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        cache = cache_dir() / "episode_index" / f"{self.name}-{h.hexdigest()[:16]}.json"
        if cache.is_file():
            try:
                data = json.loads(cache.read_text())
                counts = np.asarray(data["counts"], dtype=np.int64).reshape(len(self.items), len(ids))
                self._counts = counts
                return counts
            except (ValueError, KeyError):
                pass
        counts = np.zeros((len(self.items), len(ids)), np.int64)
        for i in range(len(self.items)):
            bc = np.bincount(self.label(i).ravel(), minlength=256)
            counts[i] = bc[ids]
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # two runs may write it at once
        tmp.write_text(json.dumps({"dataset": self.name, "classes": ids, "counts": counts.tolist()}))
        tmp.replace(cache)
        self._counts = counts
        return counts

    def images_with(self, class_id: int, min_pixels: Optional[int] = None) -> List[int]:
        """Indices of images where ``class_id`` covers at least ``min_pixels`` pixels."""
        mp = self.min_pixels if min_pixels is None else int(min_pixels)
        col = list(self.classes).index(class_id)
        return [int(i) for i in np.nonzero(self.pixel_counts()[:, col] >= max(mp, 1))[0]]

    def groups(self) -> np.ndarray:
        """One integer per image: equal for images that must not pair as support and query."""
        if self._groups is None:
            ids: Dict[str, int] = {}
            self._groups = np.asarray([ids.setdefault(it.group if it.group else f"\0{i}", len(ids))
                                       for i, it in enumerate(self.items)], dtype=np.int64)
        return self._groups

    def others(self, pool: np.ndarray, q: int, shots: int = 1) -> np.ndarray:
        """The images of ``pool`` that may be supports for the query ``q``: not ``q``, not of its group."""
        g = self.groups()
        out = pool[(pool != q) & (g[pool] != g[q])]
        if len(out) < shots:
            raise InputError(f"{self.items[q].key} of {self.name} has {len(out)} possible references outside its "
                             f"group '{self.items[q].group}'; a {shots}-shot episode needs {shots}.")
        return out

    # --- folds -----------------------------------------------------------------------------------------------
    def novel_classes(self, fold: Optional[int]) -> List[int]:
        """The classes held out of training in ``fold`` (all classes when ``fold`` is None)."""
        if fold is None:
            return list(self.classes)
        if not self.folds:
            raise InputError(f"The dataset {self.name} has no class folds; use it for evaluation without --fold.")
        if not 0 <= fold < len(self.folds):
            raise InputError(f"The dataset {self.name} has folds 0..{len(self.folds) - 1}; got {fold}.")
        return list(self.folds[fold])

    def base_classes(self, fold: Optional[int]) -> List[int]:
        """The training classes of ``fold``: every class not novel in it (none when ``fold`` is None)."""
        if fold is None:
            return []
        novel = set(self.novel_classes(fold))
        return [c for c in self.classes if c not in novel]


def _index_items(root: Path, index: str = "index.csv") -> List[Item]:
    path = root / index
    if not path.is_file():
        raise InputError(f"No {index} in {root}; is this one of the shared datasets?")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [Item(r["image"], root / r["image"], root / r["mask"], r.get("group") or None) for r in rows]


def nwpu_vhr10_dev(root) -> SegDataset:
    root = Path(root)
    classes = NWPU_CLASSES
    cj = root / "classes.json"
    if cj.is_file():
        classes = {int(k): v for k, v in json.loads(cj.read_text())["classes"].items()}
    return SegDataset("nwpu_vhr10_dev", root, _index_items(root), classes, folds=NWPU_FOLDS,
                      note="research-only imagery: read in place, never copy into the repository")


def dubai_landcover(root) -> SegDataset:
    root = Path(root)
    return SegDataset("dubai_landcover", root, _index_items(root), DUBAI_CLASSES, ignore_ids=(0,),
                      note="licence unconfirmed: read in place, never copy")


def oam_buildings(root) -> SegDataset:
    root = Path(root)
    return SegDataset("oam_buildings", root, _index_items(root), {1: "building"})


def spacenet_atlanta(root) -> SegDataset:
    root = Path(root)
    return SegDataset("spacenet_atlanta", root, _index_items(root), {1: "building"}, min_pixels=512,
                      note="9 tiles of one panchromatic chip: easy episodes")


def swiss_trees(root) -> SegDataset:
    root = Path(root)
    return SegDataset("swiss_trees", root, _index_items(root), {1: "tree"}, min_pixels=512,
                      note="4 tiny tiles: a smoke test, not a benchmark")


def generic_folder(root) -> SegDataset:
    """Any folder with ``index.csv`` (columns ``image``, ``mask``: paths relative to the folder) and
    ``classes.json``: ``{"classes": {"1": "name", ...}, "folds": [[1, 2], [3]], "ignore": [255],
    "min_pixels": 1024}`` (only ``classes`` is required)."""
    root = Path(root)
    cj = root / "classes.json"
    if not cj.is_file():
        raise InputError(f"No classes.json in {root}: it names the class ids of the masks.")
    meta = json.loads(cj.read_text())
    classes = {int(k): str(v) for k, v in meta["classes"].items()}
    return SegDataset(str(meta.get("name", root.name)), root, _index_items(root), classes,
                      ignore_ids=tuple(meta.get("ignore", ())), folds=meta.get("folds") or None,
                      min_pixels=int(meta.get("min_pixels", 1024)))


def _split_dir(root: Path, split: str, names: Sequence[str]) -> Path:
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise InputError(f"No '{split}' split in {root} (looked for {', '.join(names)}).")


def isaid(root, split: str = "val") -> SegDataset:
    """iSAID-5i patches (layout in the module docstring)."""
    root = Path(root)
    base = _split_dir(root, split, [split, split.capitalize(), {"val": "test"}.get(split, split)])
    img_dir, ann_dir = base / "images", base / "semantic_png"
    if not img_dir.is_dir() or not ann_dir.is_dir():
        raise InputError(f"Expected {img_dir} and {ann_dir} (iSAID-5i layout).")
    items = []
    for img in sorted(img_dir.glob("*.png")):
        cands = [ann_dir / f"{img.stem}_instance_color_RGB.png", ann_dir / img.name]
        mask = next((c for c in cands if c.is_file()), None)
        if mask is not None:
            items.append(Item(str(img.relative_to(root)), img, mask))
    return SegDataset(f"isaid_{split}", root, items, ISAID_CLASSES, folds=ISAID_FOLDS, palette=ISAID_PALETTE)


def loveda(root, split: str = "val") -> SegDataset:
    """LoveDA (layout in the module docstring); 0 = no-data is ignored, 1 = background."""
    root = Path(root)
    base = _split_dir(root, split, [split.capitalize(), split])
    items = []
    for domain in ("Urban", "Rural"):
        img_dir, ann_dir = base / domain / "images_png", base / domain / "masks_png"
        if not img_dir.is_dir():
            continue
        for img in sorted(img_dir.glob("*.png"), key=lambda p: (len(p.stem), p.stem)):
            mask = ann_dir / img.name
            if mask.is_file():
                items.append(Item(str(img.relative_to(root)), img, mask))
    return SegDataset(f"loveda_{split}", root, items, LOVEDA_CLASSES, ignore_ids=(0,), folds=LOVEDA_FOLDS)


READERS = {
    "nwpu_vhr10_dev": nwpu_vhr10_dev,
    "dubai_landcover": dubai_landcover,
    "oam_buildings": oam_buildings,
    "spacenet_atlanta": spacenet_atlanta,
    "swiss_trees": swiss_trees,
    "isaid": isaid,
    "loveda": loveda,
    "folder": generic_folder,
}


def open_dataset(path, kind: Optional[str] = None, split: str = "val") -> SegDataset:
    """Open a dataset folder; ``kind`` defaults to the folder's name (one of :data:`READERS`)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise InputError(f"The dataset folder {path} does not exist.")
    if kind is None:
        name = path.name.lower()
        kind = next((k for k in READERS if name.startswith(k)), None)
        if kind is None and "isaid" in name:
            kind = "isaid"
        if kind is None and "loveda" in name:
            kind = "loveda"
        if kind is None and (path / "index.csv").is_file() and (path / "classes.json").is_file():
            kind = "folder"
        if kind is None:
            raise InputError(f"Cannot tell which dataset {path} is; name it with one of: {', '.join(READERS)}.")
    if kind not in READERS:
        raise InputError(f"Unknown dataset kind '{kind}'; known: {', '.join(READERS)}.")
    reader = READERS[kind]
    return reader(path, split) if kind in ("isaid", "loveda") else reader(path)
