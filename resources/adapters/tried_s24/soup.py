"""python soup.py OUT.pt A.pt B.pt ...: uniform average of the adapters' tensors (same init)."""
import sys, hashlib, torch
out, files = sys.argv[1], sys.argv[2:]
ds = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
o = dict(ds[0])
for part in ("vcp", "dta"):
    o[part] = {k: (sum(d[part][k].float() for d in ds) / len(ds)).to(ds[0][part][k].dtype) if ds[0][part][k].is_floating_point() else ds[0][part][k]
               for k in ds[0][part]}
o["training"] = dict(ds[0]["training"], soup=[str(f) for f in files])
torch.save(o, out)
open(out + ".sha256", "w").write(hashlib.sha256(open(out, "rb").read()).hexdigest() + "  " + out.split("/")[-1] + "\n")
print("wrote", out)
