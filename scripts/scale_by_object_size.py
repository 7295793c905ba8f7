"""IoU against object size at the working scale, from the per-episode rows of ``python -m core eval --json``.

    python scripts/scale_by_object_size.py resources/adapters/scale_sweep/nwpu_fold0.scale*.eval.json

For each file: its mIoU per mode and shot count. Then, for the episodes of the first file, the mean episode IoU in
every file, binned by the references' median object size (sqrt of area, pixels) in that first file: the same
episodes at different scales, so the columns compare scales on the same objects. This is how the working-scale
rule of ``core/scale.py`` was chosen (``resources/adapters/MODEL_CARD.md``, "Working scale").
"""

import json
import sys

import numpy as np

BINS = (0, 40, 70, 110, 1e9)


def main(paths) -> int:
    runs = {}
    for path in paths:
        report = json.load(open(path))
        for shots, res in report["results"].items():
            for mode, v in res["modes"].items():
                print(f"{path}: {shots} {mode} mIoU {v.get('miou')}, scale {report.get('scale', 'none')}")
                runs.setdefault((shots, mode), []).append((path, v.get("episodes", [])))
    for (shots, mode), files in runs.items():
        base = files[0][1]
        if not base:
            continue
        print(f"\n{shots} {mode}: mean episode IoU by reference object size (px) in {files[0][0]}")
        for lo, hi in zip(BINS[:-1], BINS[1:]):
            idx = [i for i, r in enumerate(base) if r.get("ref_px") is not None and lo <= r["ref_px"] < hi]
            if not idx:
                continue
            cells = []
            for path, eps in files:
                if len(eps) == len(base):
                    cells.append(f"{np.mean([eps[i]['iou'] or 0.0 for i in idx]):.3f}")
            print(f"  {lo:4.0f}-{hi:<5.0f} n={len(idx):3d}  " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
