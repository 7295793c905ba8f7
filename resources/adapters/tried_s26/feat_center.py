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
for k in range(4): enc.layers[k].register_forward_hook(hook(f"L{k}"))
enc.neck.register_forward_hook(hook("neck"))
cache = {}
def features(i):
    if i in cache: return cache[i]
    img = ds.image(i)
    x, (h, w) = eng.preprocess(img)
    with torch.inference_mode(): enc(x)
    out = {}
    for k in range(4):
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
rng = np.random.default_rng(0)
_idx = list(range(len(ds)))[:: max(1, len(ds)//40)][:40]
DSMEAN = {}
for l0 in ["L2", "neck"]:
    acc = []
    for i in _idx:
        f, _, hw = features(i)
        acc.append(f[l0][:, :hw[0], :hw[1]].reshape(f[l0].shape[0], -1).mean(1))
    DSMEAN[l0] = torch.stack(acc).mean(0)
cache.clear()
levels = ["L2", "neck"]
VARS = ["raw", "imgc", "inorm", "dsc"]
res = {}
npairs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
for c in sorted(ds.classes):
    imgs = ds.images_with(c)
    r = {}
    for p in range(npairs):
        a, b = rng.choice(imgs, 2, replace=False)
        fa, _, hwa = features(a); fb, _, hwb = features(b)
        ma = mask64(a, c, (hwa[0], hwa[1])) ; mb = mask64(b, c, (hwb[0], hwb[1]))
        va = torch.zeros(64, 64, dtype=torch.bool); va[:hwa[0], :hwa[1]] = True
        vb = torch.zeros(64, 64, dtype=torch.bool); vb[:hwb[0], :hwb[1]] = True
        yb = (mb[vb] > 0.5).numpy().astype(np.float64)
        for l0 in levels:
          for var in VARS:
            l = l0 + "_" + var
            if l not in r: r[l] = {"iou": [], "auc": [], "iou_fb": []}
            Ar, Br = fa[l0], fb[l0]
            if var == "imgc":
                Ar = Ar - Ar[:, va].mean(1)[:, None, None]; Br = Br - Br[:, vb].mean(1)[:, None, None]
            elif var == "inorm":
                Ar = (Ar - Ar[:, va].mean(1)[:, None, None]) / (Ar[:, va].std(1)[:, None, None] + 1e-5)
                Br = (Br - Br[:, vb].mean(1)[:, None, None]) / (Br[:, vb].std(1)[:, None, None] + 1e-5)
            elif var == "dsc":
                Ar = Ar - DSMEAN[l0][:, None, None]; Br = Br - DSMEAN[l0][:, None, None]
            A = F.normalize(Ar, dim=0); B = F.normalize(Br, dim=0)
            wfg = ma * va; wbg = (1 - ma) * va
            pf = F.normalize((A * wfg).sum((1, 2)) / wfg.sum().clamp(min=1e-6), dim=0)
            pb = F.normalize((A * wbg).sum((1, 2)) / wbg.sum().clamp(min=1e-6), dim=0)
            sf = torch.einsum("c,chw->hw", pf, B)[vb].numpy(); sbg = torch.einsum("c,chw->hw", pb, B)[vb].numpy()
            for key, s in (("iou", sf), ("iou_fb", sf - sbg)):
                best = 0
                for q in np.quantile(s, np.linspace(0.5, 0.995, 40)):
                    pr = s > q; i_ = (pr & (yb > 0)).sum(); u = (pr | (yb > 0)).sum(); best = max(best, i_ / max(u, 1))
                r[l][key].append(best)
            r[l]["auc"].append(auc(sf - sbg, yb))
    res[ds.class_name(c)] = {l: {k: float(np.nanmean(v)) for k, v in r[l].items()} for l in r}
    print(ds.class_name(c), " ".join(f"{l}: {res[ds.class_name(c)][l]['iou']*100:.1f}/{res[ds.class_name(c)][l]['iou_fb']*100:.1f}/{res[ds.class_name(c)][l]['auc']:.3f}" for l in r), flush=True)
print("mean", " ".join(f"{l}: {np.mean([res[k][l]['iou'] for k in res])*100:.1f}/{np.mean([res[k][l]['iou_fb'] for k in res])*100:.1f}/{np.mean([res[k][l]['auc'] for k in res]):.3f}" for l in r))
json.dump(res, open("/work/exp/s26/feat_center.json", "w"), indent=1)
