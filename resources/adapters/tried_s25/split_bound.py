"""Upper bound: merged found objects (touching >= N true buildings) replaced by the true buildings they touch,
clipped to the component (the gaps between houses removed, nothing else). python split_bound.py DUMP EVALJSON"""
import sys, json, collections, glob
import numpy as np
from scipy import ndimage
dump, evj = sys.argv[1:3]
eps = json.load(open(evj))["results"]["1-shot"]["modes"]["virefsam"]["episodes"]
S = np.ones((3, 3))
for N in (2, 4, 100):
  acc = np.zeros(2); acc0 = np.zeros(2)
  for k, e in enumerate(eps):
    z = np.load(f"{dump}/1shot_{k+1:03d}_virefsam.npz")
    p = z["prob"].astype(np.float32) > 0.5; gt = z["gt"]; v = ~z["ign"]
    lab, n = ndimage.label(p, structure=S); glab, gn = ndimage.label(gt, structure=S)
    out = p.copy()
    for i in range(1, n + 1):
        m = lab == i
        ids = np.unique(glab[m]); ids = ids[ids > 0]
        if len(ids) >= N:
            out[m] = np.isin(glab[m], ids)
    acc += [np.sum(out[v] & gt[v]), np.sum(out[v] | gt[v])]
    acc0 += [np.sum(p[v] & gt[v]), np.sum(p[v] | gt[v])]
  print(f"N={N}: {100*acc0[0]/acc0[1]:.1f} -> {100*acc[0]/acc[1]:.1f}")
