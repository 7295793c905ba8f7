"""``python -m core train``: episodic meta-training of the VCP encoder and the DTA adapters on base classes.

SAM stays frozen; only ``ViRefSAM.trainable_parameters()`` (VCP + DTA, or VCP alone with ``--no-dta``) learn.
Every step draws episodes of the fold's *base* classes only (novel classes never appear as the episode's class;
their pixels in a target are background, as in PFENet/HSNet), K references + one target, all different images
(:func:`core.training.episodes.iter_episodes`, deterministic for ``--seed``). ``--also DATA[@CLASS,...]`` adds
other datasets' classes to the base classes (a class named like a novel class of the fold is refused); the
stream is then uniform over (dataset, class) pairs (:func:`core.training.episodes.iter_mixed_episodes`).

Per episode: Eq. 1 prototypes from the references' frozen embeddings -> ``ViRefSAM.forward`` on the target
(Eq. 2 refinement, Eq. 3 pseudo-mask, DTA-adapted encoder pass, Eq. 4 queries, SAM decoder) -> loss on SAM's
256x256 low-res logits against the target mask in the same padded frame (area fractions as soft labels;
padding and ignored pixels excluded)::

    loss = BCE + Dice + 0.2 * L_reg

AdamW (weight decay 0.01), linear warm-up then cosine decay to 0, gradient-norm clip 1.0.

Frozen features are cached on disk (``--feature-cache``, default ``cache_dir()/features``): a reference's
embedding and a target's plain embedding are the same frozen-encoder output, so each image is encoded once
over all runs; what remains per episode is the adapted encoder pass with its backward pass (the DTA adapters
sit inside the encoder) and the small VCP/decoder work. ``--no-dta`` trains VCP alone (the ablation; DTA
stays zero, the adapted pass equals the plain one).

Schedules (``--schedule``; explicit options override):

=====  ========  =====  ======  =======  =====================================================================
name   episodes  batch  lr      warm-up  notes
=====  ========  =====  ======  =======  =====================================================================
cpu    300       1      2e-4    20       this 2-core machine: ~8-15 s per episode (adapted TinyViT pass +
                                         backward at 1024 px), about an hour; a smoke-level training
gpu    16000     8      1e-4    100      one GPU (H100 class), bf16: 2000 steps; on iSAID-5i use 40000
=====  ========  =====  ======  =======  =====================================================================

Outputs in ``--out DIR``: ``adapters.pt`` (what the plugin loads: ``ViRefSAM.adapter_state_dict()`` plus a
``training`` record: backbone name and sha256, config, dataset, fold, base classes, schedule, seed),
``adapters.pt.sha256``, ``checkpoint.pt`` (adapters + optimizer + scheduler + step, for ``--resume``), and
``train_log.jsonl`` (one line per step).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import InputError, ModelError

SCHEDULES = {
    "cpu": dict(episodes=300, batch=1, lr=2e-4, warmup=20),
    "gpu": dict(episodes=16000, batch=8, lr=1e-4, warmup=100),
}
CKPT_FORMAT = "virefsam-train-checkpoint"


def _shots(text: str):
    """``--shots``: ``3`` (int) or ``1,3`` (a list: each episode draws one count)."""
    counts = [int(x) for x in str(text).split(",") if x.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"shot counts must be whole numbers >= 1, not {text!r}")
    return counts[0] if len(counts) == 1 else counts


def _fold(text: str):
    """``--fold``: a fold number, or ``all`` (None: no class held out)."""
    if str(text).strip().lower() == "all":
        return None
    return int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="dataset folder (../shared/data/nwpu_vhr10_dev, iSAID, LoveDA, ...)")
    g.add_argument("--kind", default=None, help="dataset reader (default: from the folder name)")
    g.add_argument("--split", default="train", help="split for iSAID / LoveDA (default train)")
    g.add_argument("--fold", type=_fold, required=True,
                   help="fold whose novel classes are held out, or 'all': every class trains (for the adapters "
                        "a plugin ships: a user's class is never in training, so more base classes help)")
    g.add_argument("--shots", type=_shots, default=1,
                   help="references per training episode (default 1), or several counts, e.g. 1,3: each episode "
                        "draws one (needs --batch 1)")
    g.add_argument("--min-pixels", type=int, default=None, help="class pixels an image needs to count")
    g.add_argument("--also", action="append", default=[], metavar="DATA[@CLASS,...]",
                   help="another dataset whose classes (all, or those after @) join the base classes; repeat it. "
                        "A class named like one of --data's novel classes is refused.")
    g = p.add_argument_group("schedule")
    g.add_argument("--schedule", choices=sorted(SCHEDULES), default=None,
                   help="preset (default: gpu on CUDA, cpu otherwise)")
    g.add_argument("--episodes", type=int, default=None, help="training episodes in all")
    g.add_argument("--batch", type=int, default=None, help="episodes per optimiser step")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--warmup", type=int, default=None, help="warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--reg-weight", type=float, default=0.2, help="weight of L_reg")
    g.add_argument("--no-dta", action="store_true", help="train VCP alone (ablation)")
    g.add_argument("--init", default=None, metavar="ADAPTERS",
                   help="start from these adapters ('default' = the shipped ones, or a .pt) instead of the "
                        "zero-initialised DTA and fresh VCP (e.g. to add the held-out classes to trained adapters)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="embedded", help="embedded | vit_t | vit_b | vit_l | vit_h")
    g.add_argument("--checkpoint", default=None, help="SAM checkpoint for vit_*")
    g.add_argument("--n-queries", type=int, default=64)
    g.add_argument("--n-bg", type=int, default=5)
    g.add_argument("--dta-dim", type=int, default=64)
    g.add_argument("--device", default="auto")
    g.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 (autocast of the forward pass)")
    g.add_argument("--threads", type=int, default=0)
    g.add_argument("--encoder-backend", default="auto", choices=("auto", "torch", "onnxruntime"),
                   help="what computes the frozen features (the cache's misses): auto = as the plugin")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    g.add_argument("--save-every", type=int, default=25, help="checkpoint every N steps")
    g.add_argument("--steps-this-run", type=int, default=None,
                   help="stop (with a checkpoint) after N steps; --resume continues: train in sessions")
    g.add_argument("--feature-cache", default=None, help="frozen-feature cache (default cache_dir()/features)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------------------------------------------
# pieces shared with evaluate.py

def build_engine(args):
    """(SamEngine wrapped in a disk feature cache, backbone record {name, sha256})."""
    from ..modeling.engine import SamEngine
    from ..modeling.registry import build_sam
    from ..paths import cache_dir
    from .feature_cache import CachedEngine, FeatureCache, model_tag

    sam = build_sam(args.model, args.checkpoint)
    # the plain pass as the plugin runs it (ONNX Runtime for the embedded model on the CPU in fp32, ~4x faster
    # than PyTorch here); its output is the frozen feature both backends compute (IoU of masks >= 0.99)
    engine = SamEngine(sam, device=args.device, precision=args.precision, threads=args.threads,
                       encoder_backend=getattr(args, "encoder_backend", "auto"),
                       adapted_precision=getattr(args, "adapted_precision", "int8"))
    root = Path(args.feature_cache) if args.feature_cache else cache_dir() / "features"
    cached = CachedEngine(engine, FeatureCache(root, model_tag(sam, args.model)))
    return cached, {"name": args.model, "sha256": backbone_sha256(args.model, args.checkpoint)}


def backbone_sha256(name: str, checkpoint: Optional[str]) -> Optional[str]:
    from ..modeling.checkpoints import sha256_file

    if name == "embedded":
        from ..modeling.setup_model import weights_path

        side = weights_path().with_name(weights_path().name + ".sha256")
        if side.is_file():
            return side.read_text().split()[0]
        return sha256_file(weights_path()) if weights_path().is_file() else None
    return sha256_file(checkpoint) if checkpoint else None


def file_sha256(path) -> str:
    from ..modeling.checkpoints import sha256_file

    return sha256_file(path)


def open_data(args):
    from .episodes import open_dataset

    return open_dataset(args.data, kind=args.kind, split=args.split)


def open_extra_data(args, novel_names) -> List:
    """``[(dataset, class ids), ...]`` for ``--also``; refuses a class that is novel in the primary fold."""
    from .episodes import open_dataset

    pools = []
    for spec in args.also:
        path, _, names = spec.partition("@")
        ds = open_dataset(path, split=args.split)
        classes = [ds.class_id(n.strip()) for n in names.split(",") if n.strip()] if names else list(ds.classes)
        leak = [ds.classes[c] for c in classes if ds.classes[c] in novel_names]
        if leak:
            raise InputError(f"--also {spec}: {', '.join(leak)} is a novel class of the fold; training on it "
                             "would leak the held-out class. Name the other classes after @.")
        pools.append((ds, classes))
    return pools


def prepare_image(engine, image, mask=None, ignore=None):
    """One image through the (cached) frozen encoder.

    Returns a dict: x 1x3x1024x1024, plain 1x256x64x64, input_size, valid64 1x64x64, and when masks are given
    frac64 / frac256 (mask coverage of the 64 / 256 grids) and keep256 (valid and not ignored, 256 grid).
    """
    import torch

    from ..modeling.reference_prototypes import mask_fraction_grid
    from ..modeling.prototypes import valid_grid

    x, input_size = engine.preprocess(image)
    plain = engine.encode(x)
    size = int(x.shape[-1])
    grid = int(plain.shape[-1])
    dev = plain.device
    out = {"x": x, "plain": plain, "input_size": tuple(input_size),
           "valid64": valid_grid(input_size, size, grid, device=dev)[None]}
    if mask is not None:
        out["frac64"] = mask_fraction_grid(mask, input_size, size, grid).to(dev)[None]
        out["frac256"] = mask_fraction_grid(mask, input_size, size, 4 * grid).to(dev)[None]
        keep = valid_grid(input_size, size, 4 * grid, device=dev)
        if ignore is not None:
            keep = keep & (mask_fraction_grid(ignore, input_size, size, 4 * grid).to(dev) < 0.5)
        out["keep256"] = keep[None].to(torch.float32)
    return out


# ----------------------------------------------------------------------------------------------------------------

def resolve_schedule(args, device_type: str) -> Dict[str, object]:
    name = args.schedule or ("gpu" if device_type == "cuda" else "cpu")
    s = dict(SCHEDULES[name])
    for k in ("episodes", "batch", "lr", "warmup"):
        v = getattr(args, k)
        if v is not None:
            s[k] = v
    if s["episodes"] < 1 or s["batch"] < 1:
        raise InputError("--episodes and --batch must be at least 1.")
    s["name"] = name
    s["steps"] = math.ceil(s["episodes"] / s["batch"])
    return s


def lr_lambda(warmup: int, steps: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        span = max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))

    return f


def run(args) -> int:
    import torch

    from ..modeling.losses import segmentation_loss
    from ..modeling.prototypes import Prototypes
    from ..modeling.virefsam import ViRefSAM
    from .episodes import iter_mixed_episodes, load_episode

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    if not args.resume and ckpt_path.exists():
        raise InputError(f"{out} holds a training already; add --resume to continue it or choose another --out.")

    ds = open_data(args)
    novel = ds.novel_classes(args.fold) if args.fold is not None else []
    base = ds.base_classes(args.fold) if args.fold is not None else list(ds.classes)
    extra = open_extra_data(args, {ds.classes[c] for c in novel})
    datasets = {d.name: d for d in [ds] + [d for d, _ in extra]}
    torch.manual_seed(args.seed)
    engine, backbone = build_engine(args)
    device = engine.device
    sched = resolve_schedule(args, device.type)

    model = ViRefSAM(engine.sam, n_queries=args.n_queries, n_bg=args.n_bg, dta_dim=args.dta_dim, seed=args.seed)
    init = None
    if getattr(args, "init", None) and not (args.resume and ckpt_path.exists()):
        from ..engines import resolve_adapters
        from ..params import ModelParams

        init_path = resolve_adapters(ModelParams(name=args.model, adapters=args.init))
        if init_path is None:
            raise InputError(f"--init {args.init}: no adapters to start from for the model '{args.model}'.")
        model.load_adapters(init_path)
        init = {"path": str(Path(init_path).resolve()), "sha256": file_sha256(init_path)}
    model.to(device)
    if args.no_dta:
        model.use_dta = False  # VCP alone: no adapted encoder pass, the DTA weights stay at their zero init
        for p in model.encoder.adapters.parameters():
            p.requires_grad_(False)
    params = [p for p in model.trainable_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=sched["lr"], weight_decay=args.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(sched["warmup"], sched["steps"]))

    config = {
        "dataset": ds.name, "data": str(Path(args.data).resolve()), "fold": args.fold, "base_classes": base,
        "novel_classes": novel, "class_names": {str(k): v for k, v in ds.classes.items()},
        "shots": args.shots, "episodes": sched["episodes"], "batch": sched["batch"], "lr": sched["lr"],
        "warmup": sched["warmup"], "schedule": sched["name"], "weight_decay": args.weight_decay,
        "also": [{"dataset": d.name, "data": str(d.root.resolve()), "classes": c,
                  "class_names": [d.classes[i] for i in c]} for d, c in extra],
        "reg_weight": args.reg_weight, "dta": not args.no_dta, "seed": args.seed, "min_pixels": args.min_pixels,
        "model": dict(model.config), "backbone": backbone, "precision": args.precision, "init": init,
    }
    step = 0
    if args.resume and ckpt_path.exists():
        blob = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if blob.get("format") != CKPT_FORMAT:
            raise ModelError(f"{ckpt_path} is not a training checkpoint.")
        saved = blob["config"]
        for k in ("dataset", "also", "fold", "shots", "batch", "episodes", "lr", "seed", "dta", "model", "backbone"):
            was = saved.get(k, [] if k == "also" else None)
            if was != config.get(k):
                raise InputError(f"--resume: the checkpoint was made with {k}={was}, now {config.get(k)}; "
                                 "use the same options or another --out.")
        model.load_adapters(blob["adapters"])
        opt.load_state_dict(blob["optimizer"])
        lr_sched.load_state_dict(blob["scheduler"])
        step = int(blob["step"])
        torch.set_rng_state(blob["torch_rng"])

    if isinstance(args.shots, list) and sched["batch"] > 1:
        raise InputError("Several shot counts (--shots 1,3) train one episode per step: add --batch 1.")
    stream = iter_mixed_episodes([(ds, base)] + extra, shots=args.shots, seed=args.seed,
                                 min_pixels=args.min_pixels, start=step * sched["batch"])
    use_autocast = args.precision != "fp32"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)

    def save_checkpoint() -> None:
        blob = {"format": CKPT_FORMAT, "config": config, "step": step, "adapters": model.adapter_state_dict(),
                "optimizer": opt.state_dict(), "scheduler": lr_sched.state_dict(), "torch_rng": torch.get_rng_state()}
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save(blob, tmp)
        tmp.replace(ckpt_path)

    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=sched["steps"], initial=step, unit="step", dynamic_ncols=True)
    log = open(out / "train_log.jsonl", "a")
    model.train()
    t_start, n_done = time.time(), 0
    try:
        stop_at = sched["steps"] if args.steps_this_run is None else min(sched["steps"], step + args.steps_this_run)
        while step < stop_at:
            eps = [next(stream) for _ in range(sched["batch"])]
            protos: List = []
            targets = []
            for ep in eps:
                data = load_episode(datasets[ep.dataset], ep)
                with torch.no_grad():
                    refs = [prepare_image(engine, im, m) for im, m in data.references]
                    protos.append(model.reference_prototypes(
                        torch.cat([r["plain"] for r in refs]), torch.cat([r["frac64"] for r in refs]),
                        torch.cat([r["valid64"] for r in refs])))
                    targets.append(prepare_image(engine, data.query_image, data.query_mask, data.query_ignore))
            x = torch.cat([t["x"] for t in targets])
            plain = torch.cat([t["plain"] for t in targets])
            valid = torch.cat([t["valid64"] for t in targets])
            gt = torch.cat([t["frac256"] for t in targets])
            keep = torch.cat([t["keep256"] for t in targets])
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_autocast):
                res = model(x, Prototypes.cat(protos), plain=plain, valid=valid)
            bce, dice = segmentation_loss(res["low_res_logits"], gt, keep)
            l_reg = res["l_reg"].float()
            loss = bce + dice + args.reg_weight * l_reg
            if not torch.isfinite(loss.detach()):
                raise ModelError(f"The training loss became {float(loss.detach())} at step {step}; lower --lr.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            lr_sched.step()
            step += 1
            n_done += len(eps)
            rate = n_done / max(time.time() - t_start, 1e-9)
            loss_v = float(loss.detach())
            rec = {"step": step, "loss": loss_v, "bce": float(bce.detach()), "dice": float(dice.detach()),
                   "l_reg": float(l_reg.detach()),
                   "lr": lr_sched.get_last_lr()[0], "episodes_per_s": rate,
                   "classes": [e.class_name for e in eps]}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{loss_v:.3f}", eps_s=f"{rate:.2f}")
                bar.update(1)
            if step % args.save_every == 0 or step == stop_at:
                save_checkpoint()
    except KeyboardInterrupt:
        save_checkpoint()
        raise
    finally:
        log.close()
        if bar is not None:
            bar.close()

    final = model.adapter_state_dict()
    final["training"] = dict(config, steps=step, complete=step >= sched["steps"], feature_cache_hits=engine.hits,
                             feature_cache_misses=engine.misses)
    path = out / "adapters.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(final, tmp)
    tmp.replace(path)
    digest = file_sha256(path)
    (out / "adapters.pt.sha256").write_text(f"{digest}  adapters.pt\n")
    state = "done" if step >= sched["steps"] else "partial: continue with --resume"
    print(f"adapters: {path} (sha256 {digest}); step {step}/{sched['steps']} ({state}), {n_done} episodes this run")
    return 0
