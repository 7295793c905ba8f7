"""Offline: split large found objects (merged blocks) by decoding SAM point(+box) prompts on a grid inside them
on the plain embedding; keep per-object masks mostly inside the blob and of plausible size.
python split_blobs.py DUMP EVALJSON DATA [variant...]"""
import sys, json, collections
import numpy as np, torch, torch.nn.functional as F
from scipy import ndimage
sys.path.insert(0, "/work/main")
from core.training.datasets import open_dataset
from core.modeling.registry import build_sam
from core.modeling.engine import SamEngine
from core.modeling.training_free import decode_prompts, DEFAULT_CONTEXT
torch.set_num_threads(2)
dump, evj, data = sys.argv[1:4]
ds = open_dataset(data)
eps = json.load(open(evj))["results"]["1-shot"]["modes"]["virefsam"]["episodes"]
nmax = int(sys.argv[4]) if len(sys.argv) > 4 else len(eps)
sam = build_sam("embedded"); eng = SamEngine(sam, device="cpu", precision="fp32")
S = np.ones((3, 3), bool)
# variants: (blob factor T, grid spacing factor g, box factor b (0: none), max area factor a, inside frac f)
V = {"base": None}
for T in (2, 4):
    for b in (1.5, 0):
        V[f"T{T} b{b}"] = (T, 0.7, b, 4, 0.7)
V["T2 b1.5 f0.5"] = (2, 0.7, 1.5, 4, 0.5)
V["T2 b1.5 g1"] = (2, 1.0, 1.5, 4, 0.7)
V["T2 b1.5 a2"] = (2, 0.7, 1.5, 2, 0.7)
acc = {k: collections.defaultdict(lambda: np.zeros(2)) for k in V}
npts = collections.Counter()
for k, e in enumerate(eps[:nmax]):
    z = np.load(f"{dump}/1shot_{k+1:03d}_virefsam.npz")
    prob = z["prob"].astype(np.float32); gt = z["gt"]; v = ~z["ign"]; sm = z["sup0"]
    p = prob > 0.5
    q = ds.image(e["query"]); assert q.shape[:2] == p.shape, (q.shape, p.shape)
    slab, sn = ndimage.label(sm, structure=S); areas = np.bincount(slab.ravel())[1:]
    amax, amed = float(areas.max()), float(np.median(areas))
    lab, n = ndimage.label(p, structure=S); barea = np.bincount(lab.ravel())
    x, (h, w) = eng.preprocess(q)
    with torch.inference_mode():
        emb = eng.encode(x)
    scale = 1024 / max(q.shape[:2])
    cache = {}
    for name, cfg in V.items():
        out = p.copy()
        if cfg is not None:
            T, g, bf, af, fr = cfg
            big = [i for i in range(1, n + 1) if barea[i] > T * amax]
            if big:
                s = max(8.0, g * np.sqrt(amed))
                ys, xs = np.mgrid[s / 2:p.shape[0]:s, s / 2:p.shape[1]:s]
                ys, xs = ys.ravel().astype(int), xs.ravel().astype(int)
                inb = np.isin(lab[ys, xs], big)
                ys, xs = ys[inb], xs[inb]
                key = (g, bf)
                if key not in cache and len(ys):
                    pts = torch.tensor(np.stack([xs, ys], 1) * scale, dtype=torch.float32)
                    bx = None
                    if bf:
                        half = bf * np.sqrt(amax) / 2 * scale
                        bx = torch.cat([pts - half, pts + half], 1).clamp(0, 1023)
                    with torch.inference_mode():
                        low, iou = decode_prompts(sam, emb, pts, bx, chunk=32,
                                                  context=DEFAULT_CONTEXT if bx is not None else None)
                        m = eng.postprocess(low[:, None].float(), (h, w), q.shape[:2])[:, 0] > 0
                    cache[key] = (m.numpy(), iou.numpy(), lab[ys, xs])
                    npts[name] += len(ys)
                if key in cache:
                    masks, ious, owner = cache[key]
                    add = np.zeros_like(p)
                    for j in range(len(masks)):
                        mj = masks[j]; a = mj.sum()
                        if a == 0 or a > af * amax: continue
                        blob = lab == owner[j]
                        if (mj & blob).sum() / a < fr: continue
                        add |= mj & blob
                    isbig = np.isin(lab, big)
                    out = np.where(isbig, add, p)
        acc[name][e["class"]] += [np.sum(out[v] & gt[v]), np.sum(out[v] | gt[v])]
    if (k + 1) % 5 == 0:
        print(k + 1, " | ".join(f"{nm} {100*a['building'][0]/max(a['building'][1],1):.1f}" for nm, a in acc.items()), flush=True)
for nm, a in acc.items():
    per = {c: 100 * x[0] / max(x[1], 1) for c, x in a.items()}
    print(f"{nm:16s} " + " ".join(f"{c} {x:.1f}" for c, x in per.items()), npts.get(nm, 0))
