"""Novel-class generalisation on all three folds of nwpu_vhr10_dev, with one command.

For each fold F: ``python -m core train --fold F`` (every class but the fold's two novel ones, plus the ``--also``
datasets of the shipped recipe), then ``python -m core eval --fold F`` on the novel classes (1- and 5-shot), and a
summary JSON with each fold and the mean over the folds: the expected accuracy on a class no training used.

    python scripts/folds.py --out runs/folds                       # the shipped recipe (VCP + DTA, 1000 episodes)
    python scripts/folds.py --out runs/folds_vcp --no-dta --episodes 300
    python scripts/folds.py --out runs/folds --eval-only          # evaluate what is there again
    python scripts/folds.py --out runs/folds --eval-only --nested 5 --tag nested5   # paired 1- and 5-shot

Finished trainings (``OUT/fold<F>/adapters.pt``) are reused, an interrupted one is resumed. The OpenAerialMap
training folders are made by ``scripts/oam_area_split.py OAM`` and ``scripts/oam_collages.py OAM`` (``--oam``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def run(cmd):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--oam", type=Path, default=None, help="folder with oam_buildings_train and oam_collages_train")
    p.add_argument("--folds", default="0,1,2")
    p.add_argument("--episodes", type=int, default=1000, help="training episodes per fold")
    p.add_argument("--eval-episodes", type=int, default=20, help="evaluation episodes per novel class")
    p.add_argument("--no-dta", action="store_true", help="train VCP alone (about 7x faster on a CPU)")
    p.add_argument("--kshot", default=None, help="eval --kshot")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--nested", type=int, default=None, metavar="K",
                   help="eval --nested K: 1-shot takes the first support of the K-shot episodes (paired)")
    p.add_argument("--tune-steps", type=int, default=0, help="eval --tune-steps N --tune-ignore-found (run-time tuning)")
    p.add_argument("--shots", default="1,5", help="eval --shots")
    p.add_argument("--tag", default="", help="eval JSON names fold<F>.<TAG>.eval.json, summary <TAG>.folds.json")
    p.add_argument("--summary-only", action="store_true", help="summarise the eval JSON files already there")
    a = p.parse_args(argv)
    py = sys.executable
    also = [a.data / "dubai_landcover", a.data / "spacenet_atlanta", a.data / "swiss_trees"]
    if a.oam is not None:
        also += [a.oam / "oam_buildings_train", a.oam / "oam_collages_train"]
    summary = {"recipe": {"episodes": a.episodes, "dta": not a.no_dta, "also": [str(x) for x in also]},
               "eval": {"nested": a.nested, "tune_steps": a.tune_steps, "kshot": a.kshot}, "folds": {}}
    for f in [int(x) for x in a.folds.split(",")]:
        out = a.out / f"fold{f}"
        if not (a.eval_only or a.summary_only) and not (out / "adapters.pt").is_file():
            cmd = [py, "-m", "core", "train", "--data", a.data / "nwpu_vhr10_dev", "--fold", f,
                   "--episodes", a.episodes, "--save-every", 50, "--threads", a.threads, "--out", out, "--quiet"]
            for x in also:
                cmd += ["--also", x]
            if a.no_dta:
                cmd.append("--no-dta")
            if (out / "checkpoint.pt").is_file():
                cmd.append("--resume")
            run(cmd)
        js = a.out / (f"fold{f}.{a.tag}.eval.json" if a.tag else f"fold{f}.eval.json")
        cmd = [py, "-m", "core", "eval", "--data", a.data / "nwpu_vhr10_dev", "--fold", f, "--shots", a.shots,
               "--episodes", a.eval_episodes, "--modes", "virefsam", "--adapters", out / "adapters.pt",
               "--threads", a.threads, "--quiet", "--json", js]
        if a.kshot:
            cmd += ["--kshot", a.kshot]
        if a.nested:
            cmd += ["--nested", a.nested]
        # the fold's one file, tuned only when asked (eval tunes a file without DTA by default, as the plugin)
        cmd += ["--tune-steps", a.tune_steps, "--tune-files", "all", "--tune-ignore-found"]
        if not a.summary_only:
            run(cmd)
        elif not js.is_file():
            print(f"{js} is missing: run without --summary-only to evaluate fold {f}.", file=sys.stderr)
            return 2
        res = json.loads(js.read_text())["results"]
        summary["folds"][f] = {k: round(v["modes"]["virefsam"]["miou"], 2) for k, v in res.items()}
    shots = sorted({k for v in summary["folds"].values() for k in v})
    summary["mean"] = {k: round(sum(v[k] for v in summary["folds"].values()) / len(summary["folds"]), 2)
                       for k in shots}
    (a.out / (f"{a.tag}.folds.json" if a.tag else "folds.json")).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
