"""Pseudo-mask (Eq. 3, unrefined prototypes) from the plain vs the DTA-adapted embedding, OAM collages test."""
import sys
sys.path.insert(0, "/work/main")
import numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(2)
from core.params import ModelParams
from core.engines import load_engine
from core.modeling.predictor import ReferencePredictor
from core.modeling.reference_prototypes import mask_fraction_grid
from core.modeling.prototypes import build_prototypes, similarity_maps, margin_map
from core.training.datasets import open_dataset
ds = open_dataset("/work/exp/OAM/oam_collages_test")
eng = load_engine(ModelParams(adapters="/work/main/resources/adapters/embedded_virefsam.pt", device="cpu", threads=2))
pred = ReferencePredictor(eng, adapters="/work/main/resources/adapters/embedded_virefsam.pt", zoom_views=False)
cid = sorted(ds.classes)[0] if len(ds.classes) == 1 else [k for k, v in ds.classes.items() if "build" in v][0]
rng = np.random.default_rng(0)
groups = [it.group if hasattr(it, "group") else None for it in ds.items]
def best_iou(s, y):
    b = 0
    for q in np.quantile(s, np.linspace(0.3, 0.995, 50)):
        p = s > q; b = max(b, (p & y).sum() / max((p | y).sum(), 1))
    return b
def auc(s, y):
    o = np.argsort(-s); y = y[o]; P = y.sum(); N = len(y) - P
    tp = np.cumsum(y); fp = np.cumsum(~y); return np.trapz(tp / P, fp / N)
res = {"plain": [], "adapted": []}
I = {"plain": [0, 0], "adapted": [0, 0], "final": [0, 0]}
for ep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 10):
    a, b = rng.choice(len(ds), 2, replace=False)
    while groups[a] == groups[b]:
        a, b = rng.choice(len(ds), 2, replace=False)
    ia, ib = ds.image(a), ds.image(b)
    ma = ds.class_mask(a, cid)[0].astype(bool); mb = ds.class_mask(b, cid)[0].astype(bool)
    pred.set_references([(ia, ma)])
    with torch.inference_mode():
        ta = pred._encode([ia])[0]; tb = pred._encode([ib])[0]
        oa = pred.model(ta.x, pred._protos, plain=ta.plain, valid=ta.valid, stem=ta.stem)
        ob = pred.model(tb.x, pred._protos, plain=tb.plain, valid=tb.valid, stem=tb.stem)
        final = torch.sigmoid(eng.postprocess(ob["low_res_logits"][:, :1].float(), tb.input_size, tb.original_size))[0, 0].numpy() > 0.5
        I["final"][0] += (final & mb).sum(); I["final"][1] += (final | mb).sum()
        grid = ta.plain.shape[-1]; size = int(ta.x.shape[-1])
        fa = mask_fraction_grid(ma, ta.input_size, size, grid)[None].float()
        fb = mask_fraction_grid(mb, tb.input_size, size, grid).numpy()
        vb = tb.valid[0].numpy().astype(bool)
        yb = fb[vb] >= 0.5
        for kind, FA, FB in (("plain", ta.plain, tb.plain), ("adapted", oa["embedding"], ob["embedding"])):
            pr = build_prototypes(FA.float(), fa, ta.valid, 5, 0)
            fs, bs = similarity_maps(FB.float(), pr)
            m = margin_map(fs, bs, tb.valid)[0].numpy()[vb]
            res[kind].append((best_iou(m, yb), auc(m, yb)))
            p0 = m > 0; I[kind][0] += (p0 & yb).sum(); I[kind][1] += (p0 | yb).sum()
    print(ep, {k: tuple(round(float(x), 3) for x in v[-1]) for k, v in res.items()}, flush=True)
for k in res:
    print(k, "oracle IoU %.1f AUC %.3f IoU@0 %.1f" % (100 * np.mean([r[0] for r in res[k]]), np.mean([r[1] for r in res[k]]), 100 * I[k][0] / I[k][1]))
print("final decoder IoU %.1f" % (100 * I["final"][0] / I["final"][1]))
