"""Where the OAM collages' false-positive pixels lie: python oam_false_positives.py DUMPROOT (session 23's dumps)."""
import glob, sys
import numpy as np
from scipy import ndimage

S8 = np.ones((3, 3), bool)
rows, near = [], np.zeros(6)
for f in sorted(glob.glob(f"{sys.argv[1]}/fold0/1shot_*_virefsam.npz")):
    z = np.load(f)
    p = z["prob"].astype(np.float32) > 0.5
    g = z["gt"].astype(bool)
    v = ~z["ign"].astype(bool)
    gl, _ = ndimage.label(g, S8)
    lab, n = ndimage.label(p, S8)
    for k in range(1, n + 1):
        c = lab == k
        ids = np.unique(gl[c])
        rows.append((int((ids > 0).sum()), c.sum(), (c & g).sum(), (c & ~g & v).sum()))
    d = ndimage.distance_transform_edt(~g)
    for i, t in enumerate((2, 4, 8, 16, 32, 1e9)):
        near[i] += (p & ~g & v & (d <= t)).sum()
r = np.array(rows)
for lo, hi in ((0, 0), (1, 1), (2, 3), (4, 9), (10, 10**6)):
    s = r[(r[:, 0] >= lo) & (r[:, 0] <= hi)]
    print(f"found objects touching {lo}-{hi} buildings: {len(s)}, px {s[:, 1].sum()}, true {s[:, 2].sum()}, "
          f"false {s[:, 3].sum()}, precision {s[:, 2].sum() / max(1, s[:, 1].sum()):.2f}")
print("share of false pixels within 2/4/8/16/32 px of a building:", (near[:5] / near[5]).round(2), "of", int(near[5]))
