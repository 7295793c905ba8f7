"""Offline: drop predicted components whose colour histogram is less like the reference foreground's than ...
python color_filter.py DUMPDIR EVALJSON DATA"""
import sys, json, collections, glob
import numpy as np
from PIL import Image
from scipy import ndimage
sys.path.insert(0, "/work/main")
from core.training.datasets import open_dataset

dump, evj, data = sys.argv[1:4]
ds = open_dataset(data)
eps = json.load(open(evj))["results"]["1-shot"]["modes"]["virefsam"]["episodes"]
B = 8
def codes(img):
    hsv = np.asarray(Image.fromarray(img).convert("HSV")).astype(np.int32)
    rgb = img.astype(np.int32)
    c_rgb = (rgb[..., 0] * B // 256) * B * B + (rgb[..., 1] * B // 256) * B + rgb[..., 2] * B // 256
    c_hs = (hsv[..., 0] * 16 // 256) * 8 + hsv[..., 1] * 8 // 256
    return c_rgb, c_hs
def hist(c, m, n):
    h = np.bincount(c[m], minlength=n).astype(np.float64)
    return h / max(h.sum(), 1)
def bc(p, q): return float(np.sqrt(p * q).sum())
rules = ["none", "rgb<bg", "hs<bg", "both<bg", "rgb<0.5", "rgb<bgmid", "hs<bgmid"]
acc = {r: collections.defaultdict(lambda: np.zeros(2)) for r in rules}
for k, e in enumerate(eps):
    f = f"{dump}/1shot_{k+1:03d}_virefsam.npz"
    z = np.load(f)
    prob = z["prob"].astype(np.float32); gt = z["gt"]; ign = z["ign"]; v = ~ign
    q = ds.image(e["query"]); s = ds.image(e["support"][0]); sm = z["sup0"]
    if q.shape[:2] != prob.shape:
        q = np.asarray(Image.fromarray(q).resize(prob.shape[::-1], Image.BILINEAR))
    if s.shape[:2] != sm.shape:
        s = np.asarray(Image.fromarray(s).resize(sm.shape[::-1], Image.BILINEAR))
    qr, qh = codes(q); sr, sh = codes(s)
    fr, fh = hist(sr, sm, B**3), hist(sh, sm, 128)
    br, bh = hist(sr, ~sm, B**3), hist(sh, ~sm, 128)
    base_r, base_h = bc(br, fr), bc(bh, fh)
    # reference's own components' spread: self-similarity of fg halves ~ 1
    lab, n = ndimage.label(prob > 0.5, structure=np.ones((3, 3)))
    keep = {r: np.zeros(n + 1, bool) for r in rules}
    for i in range(1, n + 1):
        m = lab == i
        cr, ch = bc(hist(qr, m, B**3), fr), bc(hist(qh, m, 128), fh)
        keep["none"][i] = True
        keep["rgb<bg"][i] = cr >= base_r
        keep["hs<bg"][i] = ch >= base_h
        keep["both<bg"][i] = cr >= base_r and ch >= base_h
        keep["rgb<0.5"][i] = cr >= 0.5
        keep["rgb<bgmid"][i] = cr >= (base_r + 1) / 2
        keep["hs<bgmid"][i] = ch >= (base_h + 1) / 2
    for r in rules:
        pred = keep[r][lab]
        acc[r][e["class"]] += [np.sum(pred[v] & gt[v]), np.sum(pred[v] | gt[v])]
for r in rules:
    per = {c: 100 * a[0] / max(a[1], 1) for c, a in acc[r].items()}
    print(f"{r:12s} " + " ".join(f"{c} {x:.1f}" for c, x in per.items()) + f"  mean {np.mean(list(per.values())):.2f}")
