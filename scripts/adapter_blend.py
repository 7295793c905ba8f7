"""How two adapters files' probabilities are best combined from the check on the reference (issue #20, session 13).

``episodes`` saves, for every episode of ``eval --nested 5 --episodes 20`` (1-shot, seed 0, the defaults), both
files' query probabilities (uint8), their checks on the reference (:func:`core.choice.reference_check`) and the
truth, one ``.npz`` per episode (about 1 MB each: kept outside the repository). ``rules`` scores combination rules
on those files (mIoU per folder: summed intersections over unions per class), so that rules are compared on the
same predictions without running the model again. The rule kept is ``core.choice.blend_weights``.

    python scripts/adapter_blend.py episodes --data ../shared/data/nwpu_vhr10_dev --fold 0 \\
        --adapters A.pt,B.pt --out ens/fold0
    python scripts/adapter_blend.py rules ens/fold0 ens/fold1 ens/fold2 [--grid]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def cmd_episodes(args) -> None:
    from adapter_choice import episode_predictors

    from core.choice import reference_check
    from core.training.episodes import load_episode
    from core.training.evaluate import _scaled

    ds, preds, eps = episode_predictors(args, args.kind)
    for p in preds[1:]:
        p._cache = preds[0]._cache  # one plain pass per image for both files
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for k, ep in enumerate(eps):
        t0 = time.time()
        data = load_episode(ds, ep)
        refs, predict_query, zoom = _scaled(data, "auto")
        ign = data.query_ignore if data.query_ignore is not None else np.zeros_like(data.query_mask)
        gt = data.query_mask & ~ign
        rec = {"class": ep.class_name, "query": ep.query, "support": list(ep.support), "zoom": zoom, "check": [],
               "qiu": []}
        arrs = {"gt": data.query_mask, "ign": ign}
        for j, p in enumerate(preds):
            rec["check"].append(reference_check(p, refs))
            p.set_references(refs)
            prob = predict_query(p)
            arrs[f"q{j}"] = (prob * 255).round().astype(np.uint8)
            q = (prob > 0.5) & ~ign
            rec["qiu"].append((int((q & gt).sum()), int((q | gt).sum())))
        np.savez_compressed(out / f"ep{k:03d}.npz", **arrs)
        rec["s"] = round(time.time() - t0, 1)
        with open(out / "episodes.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(k, json.dumps(rec), flush=True)


def softmax_rule(offset: float, temperature: float, floor: float):
    """B's weight: sigmoid((check_B - check_A - offset) / temperature), 0 under ``floor``, 1 above 1 - floor.
    offset 0: :func:`core.choice.blend_weights` for two files."""
    def rule(pa, pb, ca, cb):
        w = 1 / (1 + np.exp(-(cb - ca - offset) / temperature))
        w = 0.0 if w < floor else (1.0 if w > 1 - floor else w)
        return pa + (pb - pa) * w
    return rule


RULES = {
    "A": lambda pa, pb, ca, cb: pa,
    "B": lambda pa, pb, ca, cb: pb,
    "choice (B if its check > A's + 0.1)": lambda pa, pb, ca, cb: pb if cb > ca + 0.1 else pa,
    "mean": lambda pa, pb, ca, cb: (pa + pb) / 2,
    "max": lambda pa, pb, ca, cb: np.maximum(pa, pb),
    "band 0.1 (choice, mean within 0.1)": lambda pa, pb, ca, cb: pb if cb > ca + 0.1 else (
        (pa + pb) / 2 if cb > ca - 0.1 else pa),
    "blend (kept: offset 0, t 0.05, floor 0.1)": softmax_rule(0.0, 0.05, 0.1),
}


def _softmax(checks, temperature: float, floor: float) -> np.ndarray:
    from core.choice import blend_weights

    return np.asarray(blend_weights(list(checks), temperature, floor))


def many_rules(n: int, grid: bool = False) -> dict:
    """Rules over n >= 3 files (file 0: A, the shipped recipe; files 1..n-1: B's training seeds). Each takes the
    list of probability maps and the list of checks; a group's check is the mean of its files' checks."""
    from core.choice import blend_weights

    bs = list(range(1, n))

    def group_blend(t: float, fl: float):
        def rule(P, C):
            pb = sum(P[i] for i in bs) / len(bs)
            w = _softmax([C[0], float(np.mean([C[i] for i in bs]))], t, fl)
            return w[0] * P[0] + w[1] * pb
        return rule

    def all_blend(t: float, fl: float):
        def rule(P, C):
            w = _softmax(C, t, fl)
            return sum(wi * pi for wi, pi in zip(w, P))
        return rule

    rules = {f"file {i} alone": (lambda i: lambda P, C: P[i])(i) for i in range(n)}
    rules["mean of the B seeds"] = lambda P, C: sum(P[i] for i in bs) / len(bs)
    rules["mean of all"] = lambda P, C: sum(P) / n
    for t in (0.05, 0.1, 0.2):
        rules[f"blend A with the B seeds' mean (t {t}, floor 0.1)"] = group_blend(t, 0.1)
        rules[f"blend of every file (t {t}, floor 0.1)"] = all_blend(t, 0.1)
    if grid:
        def all_blend_bonus(t: float, fl: float, bonus: float):
            def rule(P, C):
                w = _softmax([C[0] + bonus] + list(C[1:]), t, fl)
                return sum(wi * pi for wi, pi in zip(w, P))
            return rule

        for t in (0.05, 0.1):
            for fl in (0.1, 0.2):
                for bonus in (0.0, 0.02, 0.05, 0.1):
                    rules[f"every file, A +{bonus} (t {t}, floor {fl})"] = all_blend_bonus(t, fl, bonus)
    def gated(gate, t_in: float):
        """A against the objects group as session 13's two-file rule, with ``gate(C)`` as the group's check; the
        group's weight then split among its files by a softmax of their checks at ``t_in``."""
        def rule(P, C):
            wa, wb = blend_weights([C[0], gate(C)])
            if wb == 0:
                return P[0]
            inner = _softmax([C[i] for i in bs], t_in, 0.1)
            return wa * P[0] + wb * sum(w * P[i] for w, i in zip(inner, bs))
        return rule

    for t_in in (0.05, 0.1):
        rules[f"gate by B seed 0's check, seeds by softmax t {t_in}"] = gated(lambda C: C[1], t_in)
        rules[f"gate by the seeds' lowest check, seeds by softmax t {t_in}"] = gated(
            lambda C: min(C[i] for i in bs), t_in)
        rules[f"gate by the seeds' mean check, seeds by softmax t {t_in}"] = gated(
            lambda C: float(np.mean([C[i] for i in bs])), t_in)
    rules["shipped rule (core.choice.blend_weights)"] = lambda P, C: sum(
        wi * pi for wi, pi in zip(blend_weights(list(C)), P))
    for i in bs:
        rules[f"blend A, file {i} (t 0.05, floor 0.1)"] = (lambda i: lambda P, C: sum(
            w * p for w, p in zip(_softmax([C[0], C[i]], 0.05, 0.1), (P[0], P[i]))))(i)
    return rules


def cmd_rules(args) -> None:
    rules = dict(RULES)
    n_files = len(json.loads(open(Path(args.folders[0]) / "episodes.jsonl").readline())["check"])
    if args.grid and n_files == 2:
        for m in (-0.1, -0.05, 0.0, 0.05, 0.1, 0.15):
            for t in (0.03, 0.05, 0.1, 0.2):
                for fl in (0.0, 0.1, 0.2):
                    rules[f"softmax offset {m} t {t} floor {fl}"] = softmax_rule(m, t, fl)
    res = defaultdict(list)
    multi = many_rules(n_files, args.grid) if n_files > 2 else {}
    for d in map(Path, args.folders):
        recs = [json.loads(line) for line in open(d / "episodes.jsonl")]
        acc = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        for k, r in enumerate(recs):
            z = np.load(d / f"ep{k:03d}.npz")
            gt, ign = z["gt"] & ~z["ign"], z["ign"]
            P = [z[f"q{j}"] / 255.0 for j in range(n_files)]
            pa, pb = P[0], P[1]
            for name, f in list(rules.items()) + list(multi.items()):
                prob = f(P, r["check"]) if name in multi else f(pa, pb, *r["check"][:2])
                q = (prob > 0.5) & ~ign
                acc[name][r["class"]][0] += int((q & gt).sum())
                acc[name][r["class"]][1] += int((q | gt).sum())
        for name in list(rules) + list(multi):
            res[name].append(100 * float(np.mean([i / max(u, 1) for i, u in acc[name].values()])))
    print("folders: " + ", ".join(args.folders))
    for name, v in res.items():
        print(f"{name:50s} " + " ".join(f"{x:5.1f}" for x in v) + f"   mean {np.mean(v):5.1f}")


def main() -> None:
    from adapter_choice import episodes_parser

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = episodes_parser(sub)
    e.add_argument("--kind", default=None)
    e.add_argument("--out", required=True)
    r = sub.add_parser("rules")
    r.add_argument("folders", nargs="+")
    r.add_argument("--grid", action="store_true", help="also the softmax rules over offsets, temperatures, floors")
    args = ap.parse_args()
    {"episodes": cmd_episodes, "rules": cmd_rules}[args.cmd](args)


if __name__ == "__main__":
    main()
