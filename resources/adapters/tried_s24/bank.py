"""Bank of known classes' foreground prototypes (frozen plain embedding, masked average pooling, one row per image).
python bank.py OUT.pt N_PER_CLASS  -> rows for every (dataset, class) of nwpu (all 6, tagged) + also datasets"""
import sys, numpy as np, torch
sys.path.insert(0, "/work/main")
from core.training.episodes import open_dataset
from core.modeling.registry import build_sam
from core.modeling.engine import SamEngine
from core.modeling.reference_prototypes import mask_fraction_grid
from core.modeling.prototypes import masked_average_pool, valid_grid

out, n = sys.argv[1], int(sys.argv[2])
sam = build_sam("embedded", None)
eng = SamEngine(sam, device="cpu", threads=2)
specs = [("nwpu", "/work/shared/data/nwpu_vhr10_dev"), ("dubai", "/work/shared/data/dubai_landcover"),
         ("spacenet", "/work/shared/data/spacenet_atlanta"), ("trees", "/work/shared/data/swiss_trees"),
         ("oam", "/work/exp/OAM/oam_buildings_train"), ("oamcol", "/work/exp/OAM/oam_collages_train")]
rows, tags = [], []
rng = np.random.default_rng(0)
for tag, path in specs:
    ds = open_dataset(path, split="train")
    for cid in sorted(ds.classes):
        imgs = ds.images_with(cid)
        if not imgs:
            continue
        pick = rng.choice(imgs, size=min(n, len(imgs)), replace=False)
        for i in pick:
            im = ds.image(int(i)); m, ign = ds.class_mask(int(i), cid)
            m = m.astype(bool)
            H, W = m.shape
            if max(H, W) > 1024:  # a 1024 window on the class
                ys, xs = np.nonzero(m); cy, cx = int(np.median(ys)), int(np.median(xs))
                y0 = int(np.clip(cy - 512, 0, max(0, H - 1024))); x0 = int(np.clip(cx - 512, 0, max(0, W - 1024)))
                im, m = im[y0:y0 + 1024, x0:x0 + 1024], m[y0:y0 + 1024, x0:x0 + 1024]
            if m.sum() == 0:
                continue
            x, size = eng.preprocess(np.ascontiguousarray(im))
            with torch.inference_mode():
                f = eng.encode(x)
            frac = mask_fraction_grid(m, size, 1024, 64)[None]
            val = valid_grid(size, 1024, 64)[None]
            p, ok = masked_average_pool(f, frac * val)
            if bool(ok):
                rows.append(p); tags.append(f"{tag}:{ds.class_name(cid)}")
        print(tag, ds.class_name(cid), len(pick), flush=True)
torch.save({"rows": torch.stack(rows), "tags": tags}, out)
print(len(rows))
