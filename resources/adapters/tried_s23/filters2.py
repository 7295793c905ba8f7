"""Size bound from the model's own segmentation of the reference: python filters2.py DUMPROOT shots"""
import sys, glob, collections
import numpy as np
from scipy import ndimage

root, k = sys.argv[1], int(sys.argv[2])
S8 = np.ones((3, 3), bool)

def comps_areas(mask):
    lab, n = ndimage.label(mask, S8)
    return lab, (np.bincount(lab.ravel())[1:] if n else np.zeros(0, int))

def load(fold):
    eps = []
    for f in sorted(glob.glob(f"{root}/fold{fold}/{k}shot_*_virefsam.npz")):
        z = np.load(f)
        prob = z["prob"].astype(np.float32); gt = z["gt"].astype(bool); ign = z["ign"].astype(bool)
        zoom = float(z["zoom"])
        marked = []
        for n in z.files:
            if n.startswith("sup"):
                marked += list(comps_areas(z[n].astype(bool))[1])
        own = []   # areas (native px) of the reference crops' predicted components that touch a mark
        for i in range(10):
            if f"refprob{i}" not in z.files: break
            rp = z[f"refprob{i}"].astype(np.float32) > 0.5; rm = z[f"refmask{i}"].astype(bool)
            lab, areas = comps_areas(rp)
            hit = np.unique(lab[rm & (lab > 0)])
            own += [areas[h - 1] / zoom ** 2 for h in hit]
        lab, areas = comps_areas(prob > 0.5)
        eps.append(dict(cls=str(z["cls"]), gt=gt, ign=ign, lab=lab, areas=areas,
                        marked=np.array(marked, float), own=np.array(own, float)))
    return eps

def score(eps, bound_fn):
    acc = collections.defaultdict(lambda: [0, 0])
    for e in eps:
        b = bound_fn(e)
        keep = np.flatnonzero(e["areas"] <= b) + 1
        pm = np.isin(e["lab"], keep) if keep.size else np.zeros_like(e["gt"])
        v = ~e["ign"]; p, g = pm[v], e["gt"][v]
        acc[e["cls"]][0] += int((p & g).sum()); acc[e["cls"]][1] += int((p | g).sum())
    return {c: 100 * i / u for c, (i, u) in acc.items()}

folds = {f: load(f) for f in range(3) if glob.glob(f"{root}/fold{f}/{k}shot_*")}
print("episodes without own:", sum(1 for eps in folds.values() for e in eps if e["own"].size == 0),
      "ratio own/marked median:", np.median([e["own"].max() / e["marked"].max() for eps in folds.values() for e in eps if e["own"].size]))
rules = {"none": lambda e: np.inf}
for R in (2, 3, 4, 6, 9):
    rules[f"{R}x marked"] = (lambda R: lambda e: R * e["marked"].max())(R)
    rules[f"{R}x max(marked,own)"] = (lambda R: lambda e: R * max(e["marked"].max(), e["own"].max() if e["own"].size else 0))(R)
    rules[f"{R}x own"] = (lambda R: lambda e: R * e["own"].max() if e["own"].size else np.inf)(R)
for name, fn in rules.items():
    per = {f: score(eps, fn) for f, eps in folds.items()}
    fm = {f: np.mean(list(v.values())) for f, v in per.items()}
    print(f"{name:22s} " + " / ".join(f"{fm[f]:.1f}" for f in sorted(fm)) + f"  mean {np.mean(list(fm.values())):.2f}   "
          + " ".join(f"{c[:6]}={v:.1f}" for f in sorted(per) for c, v in per[f].items()))
