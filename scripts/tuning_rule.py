"""Replay ``tune_files auto`` (core.choice.marks_complete) from two eval JSONs of the same episodes: one run with
``--tune-files vcp_alone`` and one with ``--tune-files all``, both with ``--adapters A.pt,B.pt`` (or auto), so that
every episode row has the files' weights, their share of foreground beyond the marks (``outside``) and the
intersection and union of its query (session 17 on).

    python scripts/tuning_rule.py VCP_ALONE.json ALL.json [--limits 0.5,1,2]

Per limit: each episode takes the ``all`` run's result when the kept files find at most that much beyond the marks
(as the pipeline decides), else the ``vcp_alone`` run's; per class IoU = summed intersections / summed unions, as
the eval command computes it. The shipped limit is core.choice.COMPLETE_OUTSIDE, fixed before these replays.
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.choice import COMPLETE_OUTSIDE, Check, beyond_marks  # noqa: E402


def episodes(path: str, shots: str):
    return json.loads(Path(path).read_text())["results"][shots]["modes"]["virefsam"]["episodes"]


def replay(alone, every, limit: float):
    """(mIoU %, {class: IoU %}, episodes that tune every file)."""
    inter, union, tuned = defaultdict(int), defaultdict(int), 0
    for a, b in zip(alone, every):
        if (a["class"], a["query"], a["support"]) != (b["class"], b["query"], b["support"]):
            raise SystemExit("The two files do not hold the same episodes.")
        checks = [Check(iou=c, outside=o) for c, o in zip(a["checks"], a["outside"])]
        row = b if beyond_marks(a["weights"], checks) <= limit else a
        tuned += row is b
        inter[row["class"]] += row["inter"]
        union[row["class"]] += row["union"]
    ious = {c: 100.0 * inter[c] / union[c] if union[c] else 0.0 for c in inter}
    return sum(ious.values()) / len(ious), ious, tuned


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("vcp_alone")
    p.add_argument("all")
    p.add_argument("--shots", default="1-shot")
    p.add_argument("--limits", default=f"0,0.5,{COMPLETE_OUTSIDE:g},2,3,5,inf")
    args = p.parse_args()
    alone, every = episodes(args.vcp_alone, args.shots), episodes(args.all, args.shots)
    for limit in [float(v) for v in args.limits.split(",")]:
        miou, ious, tuned = replay(alone, every, limit)
        per_class = ", ".join(f"{c} {v:.1f}" for c, v in ious.items())
        print(f"limit {limit:g}: mIoU {miou:.1f} ({per_class}); every file tuned in {tuned} of {len(alone)} episodes")


if __name__ == "__main__":
    main()
