"""Diagnostic: how well does a masked-average foreground prototype from one reference image find the class in a
target image, per feature level of the frozen TinyViT (layers 0-3 outputs, neck)? Oracle-threshold IoU and AUC at
64x64 (layer0 pooled 2x). Training-free matching, no VCP."""
import sys, json
import numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, "/work/main")
from core.modeling.registry import build_sam
from core.modeling.engine import SamEngine
from core.training.datasets import nwpu_vhr10_dev

torch.set_num_threads(2)
ds = nwpu_vhr10_dev("/work/shared/data/nwpu_vhr10_dev")
sam = build_sam("embedded"); eng = SamEngine(sam, device="cpu", precision="fp32")
enc = sam.image_encoder
feats = {}
def hook(name):
    def f(m, i, o): feats[name] = o
    return f
enc.neck.register_forward_hook(hook("neck"))
cache = {}
def features(i):
    if i in cache: return cache[i]
    img = ds.image(i)
    x, (h, w) = eng.preprocess(img)
    with torch.inference_mode(): enc(x)
    out = {}
    for k in []:
        t = feats[f"L{k}"]
        if t.dim() == 4: t = t
        else:
            n = int(round((t.shape[1]) ** 0.5)); t = t.view(1, n, n, -1).permute(0, 3, 1, 2)
        if t.shape[-1] != 64: t = F.adaptive_avg_pool2d(t, 64)
        out[f"L{k}"] = t[0].float()
    out["neck"] = feats["neck"][0].float()
    hv, wv = int(np.ceil(h / 16)), int(np.ceil(w / 16))
    cache[i] = (out, (h, w), (hv, wv))
    return cache[i]
def mask64(i, c, hw):
    m, _ = ds.class_mask(i, c)
    t = torch.from_numpy(m.astype(np.float32))[None, None]
    t = F.interpolate(t, size=hw, mode="bilinear", align_corners=False)
    full = torch.zeros(1, 1, 64, 64); full[..., :hw[0], :hw[1]] = t
    # hw is resized size /16
    return full[0, 0]
def auc(s, y):
    order = np.argsort(-s); y = y[order]; P = y.sum(); N = len(y) - P
    if P == 0 or N == 0: return np.nan
    tp = np.cumsum(y); fp = np.cumsum(1 - y)
    return np.trapz(tp / P, fp / N)

from core.modeling.prototypes import build_prototypes, similarity_maps, margin_map
def kmeans(x, w, k, iters=20, seed=0):
    # x N x C normalised, w N weights
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    if n < 2 * k: return None
    # farthest point init in feature space
    idx = [int(torch.argmax(w))]
    d = 1 - x @ x[idx[0]]
    for _ in range(1, k):
        j = int(torch.argmax(d)); idx.append(j); d = torch.minimum(d, 1 - x @ x[j])
    c = x[idx].clone()
    for _ in range(iters):
        a = (x @ c.t()).argmax(1)
        for j in range(k):
            m = a == j
            if m.any(): c[j] = (x[m] * w[m, None]).sum(0) / w[m].sum()
    return c
def best_iou(s, yb):
    best = 0
    for q in np.quantile(s, np.linspace(0.5, 0.995, 40)):
        pr = s > q; i_ = (pr & (yb > 0)).sum(); u = (pr | (yb > 0)).sum(); best = max(best, i_ / max(u, 1))
    return best
def iou0(s, yb):
    pr = s > 0; return (pr & (yb > 0)).sum(), (pr | (yb > 0)).sum()
rng = np.random.default_rng(0)
npairs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
VARS = ["base", "core", "k2", "k3", "k2raw", "k3raw"]
tot = {}
for c in sorted(ds.classes):
    imgs = ds.images_with(c)
    acc = {v: {"oracle": [], "I": 0, "U": 0} for v in VARS}
    for p in range(npairs):
        a, b = rng.choice(imgs, 2, replace=False)
        fa, _, hwa = features(a); fb, _, hwb = features(b)
        ma = mask64(a, c, (hwa[0], hwa[1])); mb = mask64(b, c, (hwb[0], hwb[1]))
        va = torch.zeros(64, 64, dtype=torch.bool); va[:hwa[0], :hwa[1]] = True
        vb = torch.zeros(64, 64, dtype=torch.bool); vb[:hwb[0], :hwb[1]] = True
        yb = (mb[vb] > 0.5).numpy()
        A = fa["neck"][None]; B = fb["neck"][None]
        frac = (ma * va)[None]
        pr = build_prototypes(A, frac, va[None], n_bg=5, seed=0)
        fg_sim, bg_sim = similarity_maps(B, pr)
        base = margin_map(fg_sim, bg_sim, vb[None])[0]
        best_bg = bg_sim.max(1).values[0]
        Bn = F.normalize(B[0], dim=0)
        An = F.normalize(A[0], dim=0)
        for v in VARS:
            if v == "base": s = base
            else:
                sel = (frac[0] >= 0.5) if v != "k2raw" and v != "k3raw" else (frac[0] > 0)
                if sel.sum() == 0: sel = frac[0] > 0
                x = An[:, sel].t(); w = frac[0][sel]
                if v == "core":
                    cs = F.normalize((A[0][:, sel] * w).sum(1), dim=0)[None]
                else:
                    k = int(v[1])
                    cs = kmeans(x, w, k)
                    if cs is None: cs = F.normalize((A[0][:, sel] * w).sum(1), dim=0)[None]
                    cs = torch.cat([F.normalize(pr.fg, dim=-1), F.normalize(cs, dim=-1)])
                fgk = torch.einsum("chw,kc->khw", Bn, F.normalize(cs, dim=-1)).max(0).values
                s = torch.where(vb, fgk - best_bg, torch.full_like(fgk, -1.0))
            sv = s[vb].numpy()
            acc[v]["oracle"].append(best_iou(sv, yb))
            i_, u_ = iou0(sv, yb); acc[v]["I"] += i_; acc[v]["U"] += u_
    name = ds.class_name(c)
    tot[name] = {v: (np.mean(acc[v]["oracle"]) * 100, acc[v]["I"] / max(acc[v]["U"], 1) * 100) for v in VARS}
    print(f"{name:20s}", " ".join(f"{v}: {tot[name][v][0]:.1f}/{tot[name][v][1]:.1f}" for v in VARS), flush=True)
print(f"{'mean':20s}", " ".join(f"{v}: {np.mean([tot[n][v][0] for n in tot]):.1f}/{np.mean([tot[n][v][1] for n in tot]):.1f}" for v in VARS))
