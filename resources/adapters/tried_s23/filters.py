"""Offline component filters on dumped eval probabilities: python filters.py DUMPROOT shots"""
import sys, glob, collections, itertools
import numpy as np
from scipy import ndimage

root, k = sys.argv[1], int(sys.argv[2])
S8 = np.ones((3, 3), bool)

def load(fold):
    eps = []
    for f in sorted(glob.glob(f"{root}/fold{fold}/{k}shot_*_virefsam.npz")):
        z = np.load(f)
        prob = z["prob"].astype(np.float32); gt = z["gt"].astype(bool); ign = z["ign"].astype(bool)
        sups = [z[n].astype(bool) for n in z.files if n.startswith("sup")]
        ref_areas = []
        for s in sups:
            lab, n = ndimage.label(s, S8)
            if n: ref_areas += list(np.bincount(lab.ravel())[1:])
        pm = prob > 0.5
        lab, n = ndimage.label(pm, S8)
        comps = []
        if n:
            idx = np.arange(1, n + 1)
            area = ndimage.sum(np.ones_like(pm), lab, idx)
            mp = ndimage.mean(prob, lab, idx)
            mx = ndimage.maximum(prob, lab, idx)
            tp = ndimage.sum(gt & ~ign, lab, idx)
            comps = list(zip(idx, area, mp, mx, tp))
        eps.append(dict(cls=str(z["cls"]), prob=prob, gt=gt, ign=ign, lab=lab, comps=comps,
                        ref=np.array(ref_areas, float)))
    return eps

def score(eps, keep_fn):
    acc = collections.defaultdict(lambda: [0, 0])
    for e in eps:
        keep = [c[0] for c in e["comps"] if keep_fn(e, c)]
        pm = np.isin(e["lab"], keep) if keep else np.zeros_like(e["gt"])
        v = ~e["ign"]
        p, g = pm[v], e["gt"][v]
        acc[e["cls"]][0] += int((p & g).sum()); acc[e["cls"]][1] += int((p | g).sum())
    return {c: 100 * i / u for c, (i, u) in acc.items()}

folds = {f: load(f) for f in range(3) if glob.glob(f"{root}/fold{f}/{k}shot_*")}
rules = {"none": lambda e, c: True}
for R in (1.5, 2, 3, 4, 6, 9, 16):
    rules[f"max<{R}x_maxref"] = (lambda R: lambda e, c: c[1] <= R * e["ref"].max())(R)
for s in (0.1, 0.2, 0.3):
    rules[f"min>{s}x_minref"] = (lambda s: lambda e, c: c[1] >= s * e["ref"].min())(s)
    rules[f"min>{s}x_medref"] = (lambda s: lambda e, c: c[1] >= s * np.median(e["ref"]))(s)
for R, s in itertools.product((2, 3, 4, 6), (0.1, 0.2)):
    rules[f"band {s}-{R}x"] = (lambda R, s: lambda e, c: s * e["ref"].min() <= c[1] <= R * e["ref"].max())(R, s)
for q in (0.5, 0.7, 0.8, 0.9):
    rules[f"rel_mean>{q}best"] = (lambda q: lambda e, c: c[2] >= q * max(cc[2] for cc in e["comps"]))(q)
for R in (3, 4, 6):
    rules[f"max<{R}x_maxref_sum"] = (lambda R: lambda e, c: c[1] <= R * e["ref"].sum())(R)
res = {}
for name, fn in rules.items():
    per = {f: score(eps, fn) for f, eps in folds.items()}
    fm = {f: np.mean(list(v.values())) for f, v in per.items()}
    res[name] = fm
    print(f"{name:22s} " + " / ".join(f"{fm[f]:.1f}" for f in sorted(fm)) + f"  mean {np.mean(list(fm.values())):.2f}   "
          + " ".join(f"{c[:8]}={v:.1f}" for f in sorted(per) for c, v in per[f].items()))
