"""Drop found components smaller than s x (smallest | median) marked object: python minsize.py DUMPROOT shots"""
import sys, glob, collections
import numpy as np
sys.path.insert(0, "/work/main/resources/adapters/tried_s24")
sys.argv = [sys.argv[0], sys.argv[1], sys.argv[2]]
src = open("/work/main/resources/adapters/tried_s24/blobs_offline.py").read().split("def score")[0]
exec(src)
def score(eps, s, stat):
    acc = collections.defaultdict(lambda: [0, 0, 0, 0])
    for e in eps:
        p = e["prob"] > 0.5
        if s > 0 and e["areas"].size and e["marked"].size:
            ref = {"min": np.min, "med": np.median}[stat](e["marked"])
            small = np.flatnonzero(e["areas"] < s * ref) + 1
            if small.size:
                p = p & ~np.isin(e["lab"], small)
        v = ~e["ign"]; pp, g = p[v], e["gt"][v]
        a = acc[e["cls"]]; a[0] += int((pp & g).sum()); a[1] += int((pp | g).sum()); a[2] += int(pp.sum()); a[3] += int(g.sum())
    return {c: (100 * i / u, 100 * i / max(P, 1), 100 * i / max(G, 1)) for c, (i, u, P, G) in acc.items()}
folds = {f: load(f) for f in range(3) if glob.glob(f"{root}/fold{f}/{k}shot_*")}
for stat in ("min", "med"):
    for s in (0, 0.05, 0.1, 0.2, 0.3, 0.5):
        per = {f: score(eps, s, stat) for f, eps in folds.items()}
        fm = {f: np.mean([x[0] for x in v.values()]) for f, v in per.items()}
        pr = np.mean([x[1] for v in per.values() for x in v.values()]); rc = np.mean([x[2] for v in per.values() for x in v.values()])
        print(f"{stat} s={s}: " + " / ".join(f"{fm[f]:.1f}" for f in sorted(fm)) + f"  mean {np.mean(list(fm.values())):.2f}  P {pr:.1f} R {rc:.1f}", flush=True)
