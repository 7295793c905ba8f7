"""Native-scale building scenes from ../shared/data/oam_buildings: collages of its 256-px tiles.

The OpenAerialMap tiles are 256 px (mostly z21, ~7 cm/px). Fed alone into SAM's 1024-px input they are upsampled 4x,
so houses look four times larger than in the plugin's own 1024-px tiles of a full orthophoto. A collage of G x G
tiles (each turned and flipped at random) is a (256 G)-px image: G = 4 is SAM's input at the orthophoto's native
scale, as in ``make demo``; G = 3 and 2 are upsampled 1.33x and 2x.

    python scripts/oam_collages.py OUT
        OUT/oam_collages_train   areas 4 (Philippines) and 5 (Nairobi): grids 2, 3, 4
        OUT/oam_collages_test    areas 1 (Zanzibar) and 2 (Kampala), the demo's places: grid 4 only

Each area's 12 tiles are dealt into two halves (alternately, in order of building fraction); a collage uses one
half's tiles only (repeats allowed) and its ``group`` column in ``index.csv`` names the half, so an episode's
reference never shows the target's tiles (core.training.episodes draws supports from other groups). Both folders
are generic dataset folders (``classes.json`` + ``index.csv``; images PNG, masks PNG 0/1); deterministic (seed 0).
Derived from OpenAerialMap imagery (CC BY 4.0) and (c) OpenStreetMap contributors (ODbL): training data only,
they are not shipped.
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SRC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oam_buildings"
TILE = 256
SPLITS = {
    "oam_collages_train": {"areas": ("4", "5"), "grids": {2: 4, 3: 4, 4: 6}},  # grid: collages per half
    "oam_collages_test": {"areas": ("1", "2"), "grids": {4: 6}},
}


def read(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as src:
        return src.read()


def collage(tiles, grid: int, rng: np.random.Generator):
    """(image HxWx3 uint8, mask HxW uint8) of grid x grid tiles drawn from ``tiles`` [(image 3xTxT, mask TxT)]."""
    n = grid * grid
    order = np.concatenate([rng.permutation(len(tiles)) for _ in range(-(-n // len(tiles)))])[:n]
    img = np.zeros((grid * TILE, grid * TILE, 3), np.uint8)
    msk = np.zeros((grid * TILE, grid * TILE), np.uint8)
    for slot, t in enumerate(order):
        im, m = tiles[t]
        im = im.transpose(1, 2, 0)
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        im, m = np.rot90(im, k), np.rot90(m, k)
        if flip:
            im, m = im[:, ::-1], m[:, ::-1]
        r, c = divmod(slot, grid)
        img[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = im[:TILE, :TILE, :3]
        msk[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = m[:TILE, :TILE] > 0
    return img, msk


def main(out: str, seed: int = 0) -> None:
    with open(SRC / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for name, spec in SPLITS.items():
        d = Path(out) / name
        (d / "images").mkdir(parents=True, exist_ok=True)
        (d / "masks").mkdir(exist_ok=True)
        index = []
        for area in spec["areas"]:
            tiles = sorted((r for r in rows if r["area"] == area), key=lambda r: float(r["building_frac"]))
            for h, half in enumerate((tiles[0::2], tiles[1::2])):
                data = [(read(SRC / r["image"]), read(SRC / r["mask"])[0]) for r in half]
                group = f"area{area}{'ab'[h]}"
                rng = np.random.default_rng([seed, int(area), h])
                for grid, count in spec["grids"].items():
                    for j in range(count):
                        img, msk = collage(data, grid, rng)
                        stem = f"{group}_g{grid}_{j}"
                        Image.fromarray(img).save(d / "images" / f"{stem}.png")
                        Image.fromarray(msk).save(d / "masks" / f"{stem}.png")
                        index.append({"image": f"images/{stem}.png", "mask": f"masks/{stem}.png", "group": group,
                                      "area": area, "grid": grid, "size": grid * TILE,
                                      "building_frac": round(float(msk.mean()), 4),
                                      "tiles": " ".join(Path(r["image"]).stem for r in half)})
        with open(d / "index.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(index[0].keys()))
            w.writeheader()
            w.writerows(index)
        (d / "classes.json").write_text(json.dumps({"name": name, "classes": {"1": "building"}}, indent=1) + "\n")
        print(f"{d}: {len(index)} collages of areas {', '.join(spec['areas'])}, grids {sorted(spec['grids'])}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
