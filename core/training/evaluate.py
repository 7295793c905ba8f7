"""``python -m core eval``: few-shot evaluation with the standard FSS protocol.

For each shot count (``--shots 1,5``) the same deterministic episodes (:func:`.episodes.sample_episodes`) are run
through :class:`core.modeling.predictor.ReferencePredictor` -- the exact inference path of the plugin -- in
each mode:

* ``virefsam``       frozen SAM + the trained VCP/DTA adapters (``--adapters``)
* ``training_free``  prototype matching -> SAM prompts, nothing trained
* ``static_prompt``  the reference masks' own points/boxes replayed on the target (baseline)
* ``vcp_no_dta``     the ablation "VCP without DTA": adapters trained with ``train --no-dta``
                     (``--ablation-adapters``), or else, labelled as such, the ``--adapters`` with every DTA
                     branch switched off at test time; tuned on the references (``--tune-steps``) exactly when
                     the ``--adapters`` file is, so that the two rows differ by DTA alone

A pixel is foreground where the predicted probability exceeds 0.5. Per novel class, intersections and unions
are summed over its episodes; mIoU is the mean over classes and FB-IoU the mean of foreground and background
IoU over all episodes (:mod:`.metrics`). Episodes: ``--episodes N`` per class (balanced, default), or
``--per-fold N`` in all (the iSAID-5i protocol: 1,000 per fold; a query image is drawn, then a class it holds).
Each shot count draws its own episodes, unless ``--nested K``: then every count takes the first supports of the
K-shot episodes, so 1-shot and 5-shot see the same queries (a paired measure of what more
references buy; with 40 episodes a fold, unpaired query sets differ by more than the effect).

Frozen-encoder outputs go through the on-disk feature cache (see :mod:`.feature_cache`), so every image is
encoded once for all modes and shot counts (and later runs). A table goes to stdout; ``--json`` writes the
per-class numbers, seed, episode count and fingerprint, model and adapter sha256, and seconds per episode.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import List, Optional

from ..errors import InputError
from ..params import DEFAULT_TUNE_STEPS, TUNE_FILES

MODES = ("virefsam", "training_free", "static_prompt", "vcp_no_dta")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--kind", default=None, help="dataset reader (default: from the folder name)")
    p.add_argument("--split", default="val", help="split for iSAID / LoveDA (default val)")
    p.add_argument("--fold", type=int, default=None, help="evaluate this fold's novel classes (default: all classes)")
    p.add_argument("--classes", default=None, help="comma-separated class names or ids (overrides --fold)")
    p.add_argument("--shots", default="1,5", help="comma-separated shot counts (default 1,5)")
    p.add_argument("--episodes", type=int, default=40, help="episodes per class (default 40)")
    p.add_argument("--per-fold", type=int, default=None, help="N episodes in all, PASCAL-5i/iSAID-5i style")
    p.add_argument("--nested", type=int, default=None, metavar="K",
                   help="paired shot counts: the K-shot episodes are drawn (K >= every --shots count) and each "
                        "count takes their first supports (same queries), so the difference is what more "
                        "references buy; default: each count draws its own episodes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--modes", default="virefsam,training_free,static_prompt,vcp_no_dta")
    p.add_argument("--adapters", default=None,
                   help="trained VCP+DTA weights, as for segment: 'default' (shipped for --model), 'none' or a .pt "
                        "path (default: none, the virefsam modes are skipped)")
    p.add_argument("--ablation-adapters", default=None, help="adapters trained with --no-dta (as --adapters)")
    p.add_argument("--model", default="embedded")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--adapted-precision", default="int8", choices=("int8", "fp32"),
                   help="weights of the adapted (DTA) pass where it runs in ONNX Runtime: int8 (default, about 1.5x faster on a CPU, masks at IoU >= 0.99 with fp32) or fp32")
    p.add_argument("--encoder-backend", default="auto", choices=("auto", "torch", "onnxruntime"),
                   help="what runs the plain encoder pass: auto = as the plugin (ONNX Runtime for the embedded "
                        "model on the CPU in fp32)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--feature-cache", default=None, help="frozen-feature cache (default cache_dir()/features)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--decoding", default="local",
                   help="training-free decoding: local (default: each prompt on a crop around its "
                        "box), exact (the whole tile) or MARGIN,CELLS (local with this crop)")
    p.add_argument("--scale", default="auto",
                   help="working scale: auto (default: the pipeline's rule, from the reference objects' size; "
                        "references cut one crop per cluster of objects, the query tiled), none (whole images "
                        "resized to 1024, the protocol of evaluation files before it) or a zoom such as 0.5 or 2")
    p.add_argument("--bg", default="per_shot", choices=("per_shot", "joint"),
                   help="background prototypes of K shots: N_b Voronoi regions per shot (default, as the plugin) or "
                        "over all shots at once (the protocol of evaluation files before it)")
    p.add_argument("--kshot", default="ensemble", choices=("ensemble", "joint"),
                   help="trained modes with K > 1 shots: ensemble (default, as the plugin: the joint decoding "
                        "averaged with each shot's own on the same adapted embedding) or joint (the joint "
                        "prototypes alone, the protocol of evaluation files before it)")
    p.add_argument("--no-zoom-views", dest="zoom_views", action="store_false",
                   help="trained modes: no zoomed views of a one-crop reference (as the plugin, the default adds a "
                        "0.7x and a 1.4x view as two more shots: RunParams.zoom_views; evaluation files before it "
                        "had none)")
    p.add_argument("--no-exclude-found", dest="exclude_found", action="store_false",
                   help="trained modes: keep what the model finds beyond the reference's marks in the background "
                        "prototypes (as the plugin, the default leaves it out when it exceeds the marked area: "
                        "RunParams.exclude_found; evaluation files before it kept it)")
    p.add_argument("--no-self-support", dest="self_support", action="store_false",
                   help="trained modes: decode the query from the references alone (the plugin's default decodes it "
                        "once more with its own confident objects: RunParams.self_support; evaluation files before "
                        "session 21 did not)")
    p.add_argument("--tune-steps", type=int, default=DEFAULT_TUNE_STEPS,
                   help="trained modes: tune VCP on the references for this many steps before the query "
                        f"(run-time tuning, core.modeling.tune; 0 = off; default {DEFAULT_TUNE_STEPS}, as the plugin)")
    p.add_argument("--tune-lr", type=float, default=1e-4, help="learning rate of --tune-steps")
    p.add_argument("--tune-ignore-found", action=argparse.BooleanOptionalAction, default=True,
                   help="--tune-steps: leave what the untuned model finds beyond the reference mask out of the loss "
                        "(default, as the plugin; evaluation files before session 15 had it off unless given)")
    p.add_argument("--tune-files", choices=TUNE_FILES, default=TUNE_FILES[0],
                   help="--tune-steps: which adapters files are tuned: vcp_alone (default, as the plugin: files "
                        "without DTA, such as the objects file, when the check keeps them), all, or auto (all when "
                        "the check finds the reference's marks complete, core.choice.marks_complete)")
    p.add_argument("--quiet", action="store_true")


def adapters_file(name: Optional[str], model: str) -> Optional[Path]:
    """``--adapters`` / ``--ablation-adapters`` as a file, through the one resolver of segment, bench, Processing
    and the dock (:func:`core.pipeline.resolve_adapters`): 'default' = the shipped file of ``model`` (None where
    none is shipped), 'none' or nothing = None, else a path that must exist (ModelError)."""
    if not name or name.lower() == "none":
        return None
    if "," in name:  # A.pt,B.pt (adapter_choices): the first is the one a single-file mode uses
        name = name.split(",")[0].strip()
    from ..params import ModelParams
    from ..pipeline import resolve_adapters

    return resolve_adapters(ModelParams(name=model, adapters=name))


def adapter_choices(name: Optional[str], model: str) -> List[Path]:
    """The files ``--adapters`` lets the reference check choose from: ``auto`` = the shipped ones
    (:func:`core.engines.adapter_candidates`), ``A.pt,B.pt`` = these (e.g. per-fold files); else one or none."""
    if name and "," in name:
        return [adapters_file(n.strip(), model) for n in name.split(",") if n.strip()]
    if name == "auto":
        from ..engines import adapter_candidates
        from ..params import ModelParams

        return adapter_candidates(ModelParams(name=model, adapters="auto"))
    path = adapters_file(name, model)
    return [] if path is None else [path]


class WeighingPredictor:
    """``--adapters auto`` or ``A.pt,B.pt``: per episode, :func:`core.choice.reference_check` of each file's
    predictor on the episode's reference crops and :func:`core.choice.blend_weights` weigh the files whose
    probabilities are averaged on the query, as the pipeline weighs them once per run (the predictors share one
    embedding cache). ``used[i]``: the episodes in which file i had a weight (``alone[i]``: the whole weight);
    ``scores`` / ``weights``: the last episode's."""

    mode = "virefsam"

    def __init__(self, predictors, paths, tune_files: str = "vcp_alone") -> None:
        self.predictors, self.paths = list(predictors), list(paths)
        self.tune_files = tune_files
        self.tuned_all: Optional[bool] = None  # "auto": whether the last episode tuned the DTA file too
        self.used = [0] * len(self.predictors)
        self.alone = [0] * len(self.predictors)
        self.scores: List[float] = []
        self.outside: List[float] = []  # the last episode's checks' foreground beyond the marks (core.choice.Check)
        self.weights: List[float] = []
        self.blend = None

    def set_references(self, references, negatives=()) -> None:
        from ..choice import weigh_checks
        from ..modeling.blend import BlendedPredictor

        self.weights, checks = weigh_checks(range(len(self.predictors)), self.predictors.__getitem__, [references])
        self.scores, self.outside = [c.iou for c in checks], [c.outside for c in checks]
        self.tuned_all = None
        if self.tune_files == "auto":  # as the pipeline: the check decides whether the DTA file is tuned too
            from ..choice import marks_complete

            self.tuned_all = marks_complete(self.weights, checks)
            for p in self.predictors:
                p.tune_dta_file(self.tuned_all)
        kept = [i for i, w in enumerate(self.weights) if w > 0]
        for i in kept:
            self.used[i] += 1
            self.alone[i] += len(kept) == 1
        self.blend = BlendedPredictor([self.predictors[i] for i in kept], [self.weights[i] for i in kept])
        self.blend.set_references(references, negatives)

    def predict(self, image):
        return self.blend.predict(image)


def _trained_kwargs(args) -> dict:
    """Keyword arguments of the trained modes' predictors: K-shot rule and run-time tuning."""
    return {"kshot": getattr(args, "kshot", None) or "ensemble", "tune_steps": getattr(args, "tune_steps", 0),
            "tune_lr": getattr(args, "tune_lr", 1e-4),
            "tune_ignore_found": getattr(args, "tune_ignore_found", False),
            "tune_files": getattr(args, "tune_files", "all"),
            "zoom_views": getattr(args, "zoom_views", True),
            "exclude_found": getattr(args, "exclude_found", True),
            "self_support": getattr(args, "self_support", True)}


def _predictors(args, engine):
    """mode -> (ReferencePredictor, note) for the requested modes; skipped modes -> (None, reason)."""
    from ..modeling.predictor import ReferencePredictor
    from ..modeling.training_free import decoder_context
    from ..modeling.virefsam import ViRefSAM

    out = OrderedDict()
    adapters = adapters_file(args.adapters, args.model)
    ablation = adapters_file(args.ablation_adapters, args.model)
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in MODES:
            raise InputError(f"Unknown mode '{mode}': choose from {', '.join(MODES)}.")
        if mode in ("training_free", "static_prompt"):
            out[mode] = (ReferencePredictor(engine, mode=mode, seed=args.seed, bg=args.bg,
                                            decoder_context=decoder_context(getattr(args, "decoding", "local"))), "")
        elif mode == "virefsam":
            candidates = adapter_choices(args.adapters, args.model)
            # --adapters auto / A.pt,B.pt: the reference check weighs them per episode; --tune-files auto: it
            # also decides, as in the pipeline, whether a DTA file is tuned
            if len(candidates) > 1 or (candidates and getattr(args, "tune_files", "all") == "auto"):
                cache = OrderedDict()  # one plain pass per image for all files
                preds = [ReferencePredictor(engine, mode="virefsam", adapters=ViRefSAM.from_adapters(
                    engine.sam, path, seed=args.seed), seed=args.seed, bg=args.bg, cache=cache,
                    **_trained_kwargs(args)) for path in candidates]
                out[mode] = (WeighingPredictor(preds, candidates, getattr(args, "tune_files", "all")), "")
                continue
            if adapters is None:
                out[mode] = (None, _no_adapters(args))
                continue
            model = ViRefSAM.from_adapters(engine.sam, adapters, seed=args.seed)
            out[mode] = (ReferencePredictor(engine, mode="virefsam", adapters=model, seed=args.seed, bg=args.bg,
                                            **_trained_kwargs(args)), "")
        else:  # vcp_no_dta
            compared = ViRefSAM.from_adapters(engine.sam, adapters, seed=args.seed) if adapters is not None else None
            if ablation is not None:
                model = ViRefSAM.from_adapters(engine.sam, ablation, seed=args.seed)
                note = f"adapters trained with --no-dta: {ablation}"
            elif compared is not None:
                model = compared
                note = "test-time ablation: the DTA branches of --adapters switched off"
            else:
                out[mode] = (None, "skipped: no --adapters / --ablation-adapters")
                continue
            kwargs = _trained_kwargs(args)
            # the ablation stands for the --adapters file without its DTA: it is tuned when that file is, so the
            # two rows differ by DTA alone (under "vcp_alone" a file with DTA is not tuned)
            if kwargs["tune_files"] in ("vcp_alone", "auto") and compared is not None and compared.use_dta:
                kwargs["tune_steps"] = 0
            if kwargs["tune_steps"] != getattr(args, "tune_steps", 0):
                note += "; not tuned, as --adapters is not"
            disable_dta(model)
            out[mode] = (ReferencePredictor(engine, mode="virefsam", adapters=model, seed=args.seed, bg=args.bg,
                                            **kwargs), note)
    return out


def _scaled(data, scale):
    """(shots, predict_query(pred) -> prob, zoom) for an episode under ``--scale`` (see :mod:`.scaled`)."""
    if str(scale).strip().lower() in ("none", ""):
        h, w = data.query_image.shape[:2]
        return data.references, (lambda pred: pred.predict(data.query_image)), 1024.0 / max(h, w)
    from .scaled import predict_at_zoom, reference_shots, zoom_for

    zoom = zoom_for(data.support_masks, scale).zoom
    shots = reference_shots(data.support_images, data.support_masks, zoom)
    return shots, (lambda pred: predict_at_zoom(pred.predict, data.query_image, zoom)), zoom


def _episode_row(ep, zoom: float, data, pred_mask) -> dict:
    """One episode's IoU with the median object size (sqrt of area) of query and references at work (px)."""
    import numpy as np

    from ..scale import object_sizes

    gt = data.query_mask & ~data.query_ignore if data.query_ignore is not None else data.query_mask
    pm = pred_mask & ~data.query_ignore if data.query_ignore is not None else pred_mask
    inter, union = int((gt & pm).sum()), int((gt | pm).sum())
    q = object_sizes(data.query_mask)
    r = np.concatenate([object_sizes(m) for m in data.support_masks])
    return {"class": ep.class_name, "query": ep.query, "support": list(ep.support),
            "iou": round(inter / union, 4) if union else None, "inter": inter, "union": union, "zoom": round(zoom, 4),
            "query_px": round(float(np.median(q)) * zoom, 1) if q.size else None,
            "ref_px": round(float(np.median(r)) * zoom, 1) if r.size else None}


def _no_adapters(args) -> str:
    if (args.adapters or "").lower() == "default":
        return f"skipped: no adapters are shipped for the model '{args.model}'"
    return "skipped: no --adapters"


def disable_dta(model) -> None:
    """Zero every DTA adapter's (zero-initialised) output projection: the adapted encoder pass then returns the
    plain embedding exactly, and VCP works alone."""
    import torch

    model.use_dta = False
    with torch.no_grad():
        for ad in model.encoder.adapters:
            ad.up.weight.zero_()
            ad.up.bias.zero_()


def _file_record(path: Optional[Path], sha256) -> Optional[dict]:
    return {"path": str(path.resolve()), "sha256": sha256(path)} if path is not None else None


def run(args) -> int:
    from .episodes import episodes_sha256, load_episode, sample_episodes
    from .metrics import FewShotMeter, format_table
    from .train import build_engine, file_sha256, open_data

    shots = [int(s) for s in str(args.shots).split(",") if s.strip()]
    ds = open_data(args)
    if args.classes:
        classes = [ds.class_id(c.strip()) for c in args.classes.split(",") if c.strip()]
    else:
        classes = ds.novel_classes(args.fold)
    engine, backbone = build_engine(args)
    preds = _predictors(args, engine)
    report = OrderedDict(
        dataset=ds.name, data=str(Path(args.data).resolve()), fold=args.fold,
        classes={str(c): ds.classes[c] for c in classes}, seed=args.seed, threshold=args.threshold,
        protocol="per_fold" if args.per_fold else "per_class", nested=getattr(args, "nested", None),
        model=backbone, device=str(engine.device), precision=args.precision,
        decoding=getattr(args, "decoding", "local"), scale=str(getattr(args, "scale", "auto")),
        bg=getattr(args, "bg", "per_shot"), kshot=_trained_kwargs(args)["kshot"],
        zoom_views=_trained_kwargs(args)["zoom_views"], exclude_found=_trained_kwargs(args)["exclude_found"],
        self_support=_trained_kwargs(args)["self_support"],
        tune={"steps": getattr(args, "tune_steps", 0), "lr": getattr(args, "tune_lr", 1e-4),
              "ignore_found": getattr(args, "tune_ignore_found", False), "files": getattr(args, "tune_files", "all")},
        adapters=_file_record(adapters_file(args.adapters, args.model), file_sha256)
        if len(adapter_choices(args.adapters, args.model)) < 2 else
        {"weighed": [_file_record(p, file_sha256) for p in adapter_choices(args.adapters, args.model)]},
        ablation_adapters=_file_record(adapters_file(args.ablation_adapters, args.model), file_sha256),
        modes={m: (note or "ok") for m, (_, note) in preds.items()},
        results=OrderedDict(),
    )
    active = [(m, p) for m, (p, _) in preds.items() if p is not None]
    if not active:
        raise InputError("No mode can run: give --adapters or choose training_free / static_prompt.")

    def draw(k: int):
        if args.per_fold:
            return sample_episodes(ds, classes, n=args.per_fold, shots=k, seed=args.seed,
                                   min_pixels=args.min_pixels, per_class=False)
        return sample_episodes(ds, classes, n=args.episodes, shots=k, seed=args.seed, min_pixels=args.min_pixels)

    nested = getattr(args, "nested", None)
    if nested is not None and nested < max(shots):
        raise InputError(f"--nested {nested} must be at least the largest shot count ({max(shots)}).")
    largest = draw(nested) if nested is not None else None
    for k in shots:
        eps = draw(k) if largest is None else [dataclasses.replace(e, support=e.support[:k]) for e in largest]
        meters = OrderedDict((m, FewShotMeter()) for m, _ in active)
        seconds = {m: 0.0 for m, _ in active}
        per_episode = {m: [] for m, _ in active}
        bar = None
        if not args.quiet:
            from tqdm import tqdm

            bar = tqdm(total=len(eps), desc=f"{k}-shot", unit="ep", dynamic_ncols=True)
        t0 = time.time()
        for n, ep in enumerate(eps, 1):
            data = load_episode(ds, ep)
            refs, predict_query, zoom = _scaled(data, args.scale)
            for m, pred in active:
                t = time.time()
                pred.set_references(refs)
                prob = predict_query(pred)
                seconds[m] += time.time() - t
                meters[m].update(ep.class_name, prob > args.threshold, data.query_mask, data.query_ignore)
                per_episode[m].append(_episode_row(ep, zoom, data, prob > args.threshold))
                if isinstance(pred, WeighingPredictor):
                    per_episode[m][-1].update(weights=[round(w, 4) for w in pred.weights],
                                              checks=[round(c, 4) for c in pred.scores],
                                              outside=[round(c, 4) for c in pred.outside])
                    if pred.tuned_all is not None:
                        per_episode[m][-1]["tuned_all"] = pred.tuned_all
            if bar is not None:
                bar.set_postfix({m: f"{meters[m].miou():.1f}" for m, _ in active})
                bar.update(1)
        if bar is not None:
            bar.close()
        print()
        print(format_table(meters, title=f"{ds.name} {k}-shot, {len(eps)} episodes, seed {args.seed}: IoU %"))
        for m, meter in meters.items():
            pct = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
            print(f"{m} precision / recall %: " + ", ".join(
                f"{c} {pct(p)} / {pct(r)}" for c, (p, r) in meter.class_precision_recall().items()))
        report["results"][f"{k}-shot"] = OrderedDict(
            episodes=len(eps), episodes_sha256=episodes_sha256(eps), wall_s=round(time.time() - t0, 1),
            modes=OrderedDict((m, dict(meters[m].summary(), s_per_episode=round(seconds[m] / max(len(eps), 1), 3),
                                       episodes=per_episode[m]))
                              for m, _ in active))
        for m, pred in active:
            if isinstance(pred, WeighingPredictor):
                from ..choice import FLOOR, TEMPERATURE

                res = report["results"][f"{k}-shot"]["modes"][m]
                res["used"] = {str(p): n for p, n in zip(pred.paths, pred.used)}
                res["alone"] = {str(p): n for p, n in zip(pred.paths, pred.alone)}
                res["blend"] = {"temperature": TEMPERATURE, "floor": FLOOR}
                print(f"{m} weighed: " + ", ".join(f"{p} in {n} episodes ({a} alone)"
                                                   for p, n, a in zip(pred.paths, pred.used, pred.alone)))
                pred.used, pred.alone = [0] * len(pred.used), [0] * len(pred.alone)
    report["feature_cache"] = {"hits": engine.hits, "misses": engine.misses}
    for m, (p, note) in preds.items():
        if p is None or note:
            print(f"{m}: {note}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"results: {args.json}")
    return 0
