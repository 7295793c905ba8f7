"""Re-threshold large found components at t2: python blob.py DUMPROOT shots"""
import sys, glob, collections
import numpy as np
from scipy import ndimage
root, k = sys.argv[1], int(sys.argv[2])
S8 = np.ones((3, 3), bool)
def load(fold):
    eps = []
    for f in sorted(glob.glob(f"{root}/fold{fold}/{k}shot_*_virefsam.npz")):
        z = np.load(f)
        prob = z["prob"].astype(np.float32)
        marked = []
        for n in z.files:
            if n.startswith("sup"):
                lab, m = ndimage.label(z[n].astype(bool), S8)
                marked += list(np.bincount(lab.ravel())[1:])
        lab, n = ndimage.label(prob > 0.5, S8)
        areas = np.bincount(lab.ravel())[1:] if n else np.zeros(0, int)
        eps.append(dict(cls=str(z["cls"]), prob=prob, gt=z["gt"].astype(bool), ign=z["ign"].astype(bool),
                        lab=lab, areas=areas, marked=np.array(marked, float) / float(z["zoom"]) ** 2))
    return eps
def score(eps, R, t2):
    acc = collections.defaultdict(lambda: [0, 0])
    for e in eps:
        p = e["prob"] > 0.5
        if R is not None and e["areas"].size:
            big = np.flatnonzero(e["areas"] > R * np.median(e["marked"])) + 1
            if big.size:
                inb = np.isin(e["lab"], big)
                p = np.where(inb, e["prob"] > t2, p)
        v = ~e["ign"]; pp, g = p[v], e["gt"][v]
        acc[e["cls"]][0] += int((pp & g).sum()); acc[e["cls"]][1] += int((pp | g).sum())
    return {c: 100 * i / u for c, (i, u) in acc.items()}
folds = {f: load(f) for f in range(3) if glob.glob(f"{root}/fold{f}/{k}shot_*")}
for R, t2 in [(None, 0)] + [(R, t) for R in (3, 10, 30) for t in (0.6, 0.7, 0.8)]:
    per = {f: score(eps, R, t2) for f, eps in folds.items()}
    fm = {f: np.mean(list(v.values())) for f, v in per.items()}
    print(f"R={R} t2={t2}: " + " / ".join(f"{fm[f]:.1f}" for f in sorted(fm)) + f"  mean {np.mean(list(fm.values())):.2f}", flush=True)
