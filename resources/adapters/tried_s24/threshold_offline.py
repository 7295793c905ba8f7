"""Per-run threshold from the reference's self-segmentation: python thr.py DUMPROOT shots"""
import sys, glob, collections
import numpy as np
root, k = sys.argv[1], int(sys.argv[2])
TS = np.round(np.arange(0.2, 0.81, 0.05), 2)
def load(fold):
    eps = []
    for f in sorted(glob.glob(f"{root}/fold{fold}/{k}shot_*_virefsam.npz")):
        z = np.load(f)
        prob = z["prob"].astype(np.float32); gt = z["gt"].astype(bool); ign = z["ign"].astype(bool)
        ri = []
        for i in range(10):
            if f"refprob{i}" not in z.files: break
            rp = z[f"refprob{i}"].astype(np.float32); rm = z[f"refmask{i}"].astype(bool)
            ri.append([(np.sum((rp > t) & rm), np.sum((rp > t) | rm)) for t in TS])
        ri = np.array(ri).sum(0) if ri else None
        v = ~ign
        tgt = np.array([(np.sum((prob[v] > t) & gt[v]), np.sum((prob[v] > t) | gt[v])) for t in TS])
        eps.append(dict(cls=str(z["cls"]), ref=ri, tgt=tgt))
    return eps
def score(eps, choose):
    acc = collections.defaultdict(lambda: np.zeros(2))
    for e in eps:
        j = choose(e)
        acc[e["cls"]] += e["tgt"][j]
    return {c: 100 * a[0] / max(a[1], 1) for c, a in acc.items()}
folds = {f: load(f) for f in range(3) if glob.glob(f"{root}/fold{f}/{k}shot_*")}
j05 = int(np.argmin(abs(TS - 0.5)))
def refbest(e, shrink=0.0, lo=0.2, hi=0.8):
    if e["ref"] is None: return j05
    iou = e["ref"][:, 0] / np.maximum(e["ref"][:, 1], 1)
    ok = (TS >= lo - 1e-9) & (TS <= hi + 1e-9)
    iou = np.where(ok, iou, -1)
    t = TS[int(np.argmax(iou))]
    t = 0.5 + (1 - shrink) * (t - 0.5)
    return int(np.argmin(abs(TS - t)))
rules = {f"fixed {t}": (lambda j: lambda e: j)(j) for j, t in enumerate(TS) if t in (0.3, 0.4, 0.5, 0.6)}
rules["oracle"] = lambda e: int(np.argmax(e["tgt"][:, 0] / np.maximum(e["tgt"][:, 1], 1)))
for lo, hi in ((0.2, 0.8), (0.3, 0.7), (0.4, 0.6)):
    for s in (0.0, 0.5):
        rules[f"ref-best [{lo},{hi}] shrink {s}"] = (lambda lo, hi, s: lambda e: refbest(e, s, lo, hi))(lo, hi, s)
for name, fn in rules.items():
    per = {f: score(eps, fn) for f, eps in folds.items()}
    fm = {f: np.mean(list(v.values())) for f, v in per.items()}
    print(f"{name:28s} " + " / ".join(f"{fm[f]:.1f}" for f in sorted(fm)) + f"  mean {np.mean(list(fm.values())):.2f}")
