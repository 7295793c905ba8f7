"""Two adapters files and a check on the reference that chooses between them (issue #20; core/choice.py).

The shipped file (VCP + DTA) finds buildings; a VCP-alone file trained with three references per episode finds
NWPU-like objects better and buildings badly. This script measures a rule that picks one of the two per run from
the reference alone: each file segments the reference crops, and the score is the IoU with the marks of the
predicted objects that touch a marked object (objects found elsewhere in the crop are left out: an analyst's marks
are partial). With one crop the file segments it from itself; with several, each crop from the others
(leave-one-out). The file with the higher score is chosen (``--margin``: the second file only when it is better by
more than this).

    # per episode of `eval --nested 5 --episodes 20`, 1-shot: both files' check and both files' query result
    python scripts/adapter_choice.py episodes --data ../shared/data/nwpu_vhr10_dev --fold 0 \\
        --adapters A.pt,B.pt --json fold0.json
    python scripts/adapter_choice.py episodes --data OAM/oam_collages_test --adapters A.pt,B.pt --json oam.json
    # the check on the demo's references (the close four houses, and --spread's three crops)
    python scripts/adapter_choice.py demo --adapters A.pt,B.pt --json demo.json
    # mIoU (per class: summed intersections / summed unions) of A, B, the choice and the per-episode oracle
    python scripts/adapter_choice.py summary fold0.json fold1.json fold2.json [--margin 0]
    # the margin of core.choice: the pipeline's checks (an `eval --adapters A.pt,B.pt` JSON, margin 0) with each
    # file's query result on the same episodes (an `episodes` JSON), for several margins
    python scripts/adapter_choice.py margins --eval auto.fold0.json --episodes fold0.json [...] --margins 0,0.1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def touching_iou(prob: np.ndarray, marks: np.ndarray):
    """(intersection, union) of the marks and the predicted 8-connected objects that touch a marked pixel."""
    from scipy import ndimage

    pm = prob > 0.5
    lab, _ = ndimage.label(pm, structure=np.ones((3, 3)))
    touch = np.unique(lab[marks & pm])
    kept = np.isin(lab, touch[touch > 0])
    return int((kept & marks).sum()), int((kept | marks).sum())


def reference_check(pred, shots, predict=None):
    """The check of one predictor on its reference crops: self with one crop, leave-one-out with several.
    shots: [(image, mask)]; predict(pred, image) -> probability (default pred.predict). Returns (inter, union)."""
    predict = predict or (lambda p, im: p.predict(im))
    inter = union = 0
    for i, (img, mask) in enumerate(shots):
        pred.set_references(shots if len(shots) == 1 else [s for j, s in enumerate(shots) if j != i])
        a, b = touching_iou(predict(pred, img), mask)
        inter, union = inter + a, union + b
    return inter, union


def episode_predictors(args, kind=None):
    """(dataset, [one trained predictor per file of ``args.adapters``], the 1-shot episodes of ``eval --nested 5
    --episodes N``, seed 0) as the eval command builds them (also used by scripts/adapter_blend.py)."""
    import torch

    from core.cli import build_parser
    from core.training.episodes import sample_episodes
    from core.training.evaluate import _predictors
    from core.training.train import build_engine, open_data

    torch.set_num_threads(args.threads)
    engine, preds, ds = None, [], None
    for f in args.adapters.split(","):
        argv = ["eval", "--data", args.data] + (["--fold", str(args.fold)] if args.fold is not None else []) + [
            "--shots", "1", "--nested", "5", "--episodes", str(args.episodes), "--modes", "virefsam",
            "--adapters", f, "--threads", str(args.threads), "--quiet"] + (["--kind", kind] if kind else [])
        a = build_parser().parse_args(argv)
        if engine is None:
            ds = open_data(a)
            engine, _ = build_engine(a)
        preds.append(_predictors(a, engine)["virefsam"][0])
    classes = ds.novel_classes(args.fold) if args.fold is not None else list(ds.classes)
    eps = [dataclasses.replace(e, support=e.support[:1])
           for e in sample_episodes(ds, classes, n=args.episodes, shots=5, seed=0, min_pixels=None)]
    return ds, preds, eps


def cmd_episodes(args) -> None:
    from core.training.episodes import load_episode
    from core.training.evaluate import _scaled
    from core.training.scaled import predict_at_zoom

    ds, preds, eps = episode_predictors(args)
    rows = []
    for ep in eps:
        data = load_episode(ds, ep)
        refs, predict_query, zoom = _scaled(data, "auto")
        rec = {"class": ep.class_name, "query": ep.query, "support": list(ep.support), "touch": [], "qiu": []}
        gt = data.query_mask & ~data.query_ignore if data.query_ignore is not None else data.query_mask
        for p in preds:
            p.set_references(refs)
            i, u = touching_iou(predict_at_zoom(p.predict, data.support_images[0], zoom), data.support_masks[0])
            rec["touch"].append(i / u if u else 0.0)
            q = predict_query(p) > 0.5
            q = q & ~data.query_ignore if data.query_ignore is not None else q
            rec["qiu"].append((int((q & gt).sum()), int((q | gt).sum())))
        rows.append(rec)
        print(json.dumps(rec), flush=True)
    Path(args.json).write_text(json.dumps(rows))


def cmd_demo(args) -> None:
    import torch

    from core.demo import demo_params, spread_reference
    from core.engines import load_engine, make_predictor
    from core.run_references import _class_references

    torch.set_num_threads(args.threads)
    out = {}
    for variant in ("close", "spread"):
        params = demo_params(Path("unused"))
        if variant == "spread":
            params = dataclasses.replace(params, references=(spread_reference(),))
        engine = load_engine(params.model)
        shots = [(r.image, r.mask) for r in _class_references(params, params.class_specs())[0].refs]
        for f in args.adapters.split(","):
            i, u = reference_check(make_predictor(engine, params, f), shots)
            out[f"{variant} {f}"] = {"crops": len(shots), "check": round(i / u, 3) if u else 0.0}
            print(variant, f, out[f"{variant} {f}"], flush=True)
    Path(args.json).write_text(json.dumps(out, indent=1))


def cmd_summary(args) -> None:
    means = defaultdict(list)
    for path in args.files:
        acc = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        chose_b = []
        for r in json.loads(Path(path).read_text()):
            (ia, ua), (ib, ub) = r["qiu"]
            pick_b = r["touch"][1] > r["touch"][0] + args.margin
            chose_b.append(pick_b)
            best = max((ia, ua), (ib, ub), key=lambda t: t[0] / max(t[1], 1))
            for name, (i, u) in (("A", (ia, ua)), ("B", (ib, ub)), ("choice", (ib, ub) if pick_b else (ia, ua)),
                                 ("oracle", best)):
                acc[name][r["class"]][0] += i
                acc[name][r["class"]][1] += u
        res = {n: 100 * float(np.mean([i / max(u, 1) for i, u in d.values()])) for n, d in acc.items()}
        for n, v in res.items():
            means[n].append(v)
        print(f"{path}: " + ", ".join(f"{n} {v:.1f}" for n, v in res.items())
              + f"; B chosen in {sum(chose_b)} of {len(chose_b)} episodes")
    print("mean: " + ", ".join(f"{n} {np.mean(v):.1f}" for n, v in means.items()))


def cmd_margins(args) -> None:
    margins = [float(m) for m in args.margins.split(",")]
    for m in margins:
        out = []
        for ev, epi in zip(args.eval, args.episodes):
            checks = json.loads(Path(ev).read_text())["results"]["1-shot"]["modes"]["virefsam"]["episodes"]
            acc = defaultdict(lambda: [0, 0])
            for e, r in zip(checks, json.loads(Path(epi).read_text())):
                assert (e["query"], e["support"]) == (r["query"], r["support"]), "not the same episodes"
                a, b = e["checks"]
                (ia, ua), (ib, ub) = r["qiu"]
                i, u = (ib, ub) if b > a + m else (ia, ua)
                acc[e["class"]][0] += i
                acc[e["class"]][1] += u
            out.append(100 * float(np.mean([i / max(u, 1) for i, u in acc.values()])))
        print(f"margin {m}: " + " / ".join(f"{v:.1f}" for v in out))


def episodes_parser(sub):
    """The ``episodes`` subcommand's arguments of :func:`episode_predictors` (also scripts/adapter_blend.py)."""
    e = sub.add_parser("episodes")
    e.add_argument("--data", required=True)
    e.add_argument("--fold", type=int, default=None)
    e.add_argument("--episodes", type=int, default=20)
    e.add_argument("--adapters", required=True, help="A.pt,B.pt")
    e.add_argument("--threads", type=int, default=1)
    return e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = episodes_parser(sub)
    e.add_argument("--json", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--adapters", required=True, help="A.pt,B.pt")
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--json", required=True)
    s = sub.add_parser("summary")
    s.add_argument("files", nargs="+")
    s.add_argument("--margin", type=float, default=0.0)
    g = sub.add_parser("margins")
    g.add_argument("--eval", nargs="+", required=True)
    g.add_argument("--episodes", nargs="+", required=True)
    g.add_argument("--margins", default="0,0.02,0.05,0.08,0.1,0.15,0.2")
    args = ap.parse_args()
    {"episodes": cmd_episodes, "demo": cmd_demo, "summary": cmd_summary, "margins": cmd_margins}[args.cmd](args)


if __name__ == "__main__":
    main()
