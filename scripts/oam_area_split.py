"""Split ../shared/data/oam_buildings by area into two dataset folders (symlinked images and masks, a filtered
index.csv each), as used to train and evaluate the shipped adapters (resources/adapters/MODEL_CARD.md):

    python scripts/oam_area_split.py OUT            # OUT/oam_buildings_train: areas 4, 5; OUT/oam_buildings_test: 1, 2

Areas 1 (Zanzibar) and 2 (Kampala) are the places of the demo rasters, so they stay out of training.
"""

import csv
import os
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oam_buildings"
SPLITS = {"oam_buildings_train": {"4", "5"}, "oam_buildings_test": {"1", "2"}}


def main(out: str) -> None:
    rows = list(csv.DictReader(open(SRC / "index.csv", newline="")))
    for name, areas in SPLITS.items():
        d = Path(out) / name
        d.mkdir(parents=True, exist_ok=True)
        for sub in ("images", "masks", "labels_geojson"):
            if (SRC / sub).exists() and not (d / sub).exists():
                os.symlink(SRC / sub, d / sub)
        kept = [r for r in rows if r["area"] in areas]
        with open(d / "index.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(kept)
        print(f"{d}: {len(kept)} tiles of areas {', '.join(sorted(areas))}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
