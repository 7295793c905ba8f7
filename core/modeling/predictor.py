"""The one inference API used by the pipeline and the evaluation.

    pred = ReferencePredictor(engine, mode="virefsam" | "training_free" | "static_prompt",
                              adapters=None | path | ViRefSAM)
    pred.set_references([(image HxWx3 uint8, mask HxW bool), ...])    # K shots, encoded once
    prob = pred.predict(tile)                                           # HxW float32 in [0, 1]
    probs = pred.predict_batch([tile, ...])                             # one batched encoder pass

Modes:

* ``virefsam`` - frozen SAM + trained VCP/DTA adapters (:class:`.virefsam.ViRefSAM`). Without adapters
  (``adapters=None``) there is nothing trained to run, so the predictor runs ``training_free`` instead and
  says so in :attr:`ReferencePredictor.mode` (``requested_mode`` keeps what was asked). With K > 1 shots,
  ``kshot="ensemble"`` (default) averages each shot's own decoding with the joint one
  (:meth:`.virefsam.ViRefSAM.shot_ensemble`); ``kshot="joint"`` decodes the joint prototypes alone.
  ``self_support=True`` (``RunParams.self_support``, on in a run by default) decodes each target once more with
  its own confident objects beside the reference (:meth:`.virefsam.ViRefSAM.self_support`), for a reference set
  of one crop (:attr:`ReferencePredictor.self_support_applies`).
* ``training_free`` - prototype matching -> per-component prompts -> SAM -> prototype filter -> union
  (:mod:`.training_free`).
* ``static_prompt`` - the reference masks' own points and boxes replayed on the target (ablation baseline).

The engine (``core.modeling.engine.SamEngine``) supplies the model (``engine.sam``), the device and the
pre/post-processing (``preprocess``, ``encode``, ``postprocess``). Each target's plain (frozen-encoder)
embedding does not depend on the class; the last ``cache_size`` of them are kept, keyed by the tile's bytes,
so the same tile predicted for another reference set skips that encoder pass (``cache=`` shares them
between predictors).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, ModelError
from ..scale import ZOOM_VIEWS, zoom_view
from .prototypes import (
    GRID,
    Prototypes,
    build_prototypes,
    negative_cells,
    negative_components,
    negative_prototypes,
    valid_grid,
    with_negatives,
)
from .training_free import (
    DEFAULT_CONTEXT,
    DEFAULT_WINDOW_MARGIN,
    NO_MASK_LOGIT,
    static_prompt_logits,
    static_prompts_from_mask,
    training_free_logits,
)
from .virefsam import ViRefSAM

MODES = ("virefsam", "training_free", "static_prompt")
KSHOTS = ("ensemble", "joint")


@dataclass
class _Target:
    x: torch.Tensor  # 1 x 3 x 1024 x 1024
    input_size: Tuple[int, int]
    original_size: Tuple[int, int]
    plain: torch.Tensor  # 1 x 256 x 64 x 64
    valid: torch.Tensor  # 1 x 64 x 64 bool
    stem: Optional[torch.Tensor] = None  # 1 x 16384 x 128: the plain pass's stem tokens, for the adapted pass in ORT


def _check_image(image, what: str = "image") -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise InputError(f"The {what} must be an RGB array of shape HxWx3 and type uint8, got {a.shape} {a.dtype}.")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise InputError(f"The {what} is too small ({a.shape[1]}x{a.shape[0]} pixels).")
    return a


def _digest(image: np.ndarray) -> str:
    """The tile's cache key: sha256 of its shape and pixels (SHA extensions make it the fastest hash in hashlib
    on current x86 CPUs: 1.5 ms for a 1024 x 1024 RGB tile, blake2b 2.6 ms); the pixels are not copied."""
    h = hashlib.sha256()
    h.update(str(image.shape).encode())
    h.update(memoryview(np.ascontiguousarray(image)).cast("B"))
    return h.hexdigest()


def mask_fraction_grid(
    mask: np.ndarray, input_size: Tuple[int, int], img_size: int = 1024, grid: int = GRID
) -> torch.Tensor:
    """Reference mask (H x W bool) -> fraction of each embedding cell it covers (grid x grid), in the padded
    input frame: resized like the image to ``input_size`` (antialiased), padded bottom/right, area-pooled."""
    h, w = input_size
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    m = F.pad(m, (0, img_size - w, 0, img_size - h))
    return F.adaptive_avg_pool2d(m, grid)[0, 0].clamp(0.0, 1.0)


# an analyst marks a few of many objects: where the model finds more than this many times the marked area in
# objects touching no mark of its own reference crops, the marks count as partial (as core.choice.COMPLETE_OUTSIDE)
PARTIAL_MARKS = 1.0
# a reference cell at least this much covered by such an object is no background cell (session 19)
FOUND_CELL = 0.25


def unmarked_found(prob: np.ndarray, marks: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """H x W bool: the predicted 8-connected objects (``prob > threshold``) that touch no marked pixel: what a
    model finds in a reference crop beyond the analyst's marks (other objects of the class, or its errors)."""
    from scipy import ndimage

    found = np.asarray(prob) > threshold
    labels, _ = ndimage.label(found, structure=np.ones((3, 3), dtype=bool))
    touching = np.unique(labels[np.asarray(marks, dtype=bool) & found])
    return found & ~np.isin(labels, touching[touching > 0])


def _adapters_model(engine, path: Union[str, Path], seed: int):
    """``ViRefSAM.from_adapters(engine.sam, path)``, reused from ``engine.adapter_models`` while the file is
    unchanged (same path, modification time and size): a second run on the same engine reads nothing again."""
    from .virefsam import ViRefSAM

    cache = getattr(engine, "adapter_models", None)
    p = Path(path)
    try:
        st = p.stat()
        key = (str(p.resolve()), st.st_mtime_ns, st.st_size, int(seed))
    except OSError:
        key = None  # from_adapters says what is wrong with the path
    if cache is None or key is None:
        return ViRefSAM.from_adapters(engine.sam, path, seed=seed)
    model = cache.get(key)
    if model is None:
        model = ViRefSAM.from_adapters(engine.sam, path, seed=seed)
        while len(cache) >= 2:  # a few MB each; two adapter files in turn stay loaded
            cache.pop(next(iter(cache)))
        cache[key] = model
    return model


_PROTO_FIELDS = ("fg", "fg_valid", "bg", "bg_valid")


def _proto_arrays(p: Prototypes) -> dict:
    """Prototypes as plain CPU numpy arrays (:meth:`ReferencePredictor.reference_state`)."""
    return {k: getattr(p, k).detach().cpu().numpy() for k in _PROTO_FIELDS}


def _proto_tensors(arrays: dict, dev: torch.device, dtype: torch.dtype) -> Prototypes:
    """:func:`_proto_arrays` back as Prototypes on ``dev`` (features in ``dtype``, validity as it was)."""
    t = {k: torch.from_numpy(np.asarray(arrays[k])) for k in _PROTO_FIELDS}
    return Prototypes(t["fg"].to(dev, dtype), t["fg_valid"].to(dev), t["bg"].to(dev, dtype), t["bg_valid"].to(dev))


class ReferencePredictor:
    """Segment a class, given by K reference (image, mask) pairs, in target tiles (see the module doc)."""

    def __init__(
        self,
        engine,
        mode: str = "virefsam",
        adapters: Union[None, str, Path, "torch.nn.Module"] = None,
        n_bg: int = 5,
        seed: int = 0,
        max_prompts: int = 32,
        use_box: bool = True,
        window_margin: Optional[float] = DEFAULT_WINDOW_MARGIN,
        decoder_context: Optional[Tuple[float, int]] = DEFAULT_CONTEXT,
        cache_size: int = 2,
        cache: "Optional[OrderedDict]" = None,
        bg: str = "per_shot",
        kshot: str = "ensemble",
        tune_steps: int = 0,
        tune_lr: float = 1e-4,
        tune_ignore_found: bool = False,
        tune_files: str = "all",
        zoom_views: bool = True,
        exclude_found: bool = False,
        self_support: bool = False,
    ) -> None:
        if mode not in MODES:
            raise InputError(f"Unknown mode '{mode}': choose one of {', '.join(MODES)}.")
        if kshot not in KSHOTS:
            raise InputError(f"Unknown K-shot method '{kshot}': choose one of {', '.join(KSHOTS)}.")
        self.engine = engine
        self.sam = engine.sam
        self.requested_mode = mode
        self.n_bg, self.seed = n_bg, seed
        self.max_prompts, self.use_box = max_prompts, use_box
        self.window_margin = window_margin  # training-free masks are upscaled only near their prompt
        # training-free: each prompt decoded on a crop around its box ((margin, min cells)); None: the whole tile
        self.decoder_context = decoder_context
        # with zoomed views a reference is three images: keep them all, so that another class marked on the same
        # crop (a several-class run sharing ``cache``) encodes none of them again
        self.cache_size = max(cache_size, 1 + len(ZOOM_VIEWS)) if zoom_views and cache_size > 0 else cache_size
        # background prototypes: N_b Voronoi regions per shot (K x N_b, the default: on NWPU's novel classes 5-shot
        # 22.9 mIoU against 19.6 jointly, buildings 56.6 / 56.7) or N_b over all shots at once
        self.bg_per_shot = bg == "per_shot"
        # K > 1 shots, trained mode: "ensemble" (the default) also decodes each shot's own prototypes on the one
        # adapted embedding and averages the probabilities with the joint decoding (3 NWPU folds, 5-shot mIoU 26.5
        # against 25.3 joint); "joint" decodes the joint prototypes alone
        self.kshot = kshot
        # run-time tuning of VCP on the references (:mod:`.tune`), trained mode only; 0 = off;
        # ``tune_progress(step, steps)`` is called after each step (the pipeline's progress and cancel)
        self.tune_steps, self.tune_lr = int(tune_steps), float(tune_lr)
        self.tune_progress = None
        self.tune_ignore_found = tune_ignore_found  # partial marks: see tune.tune_vcp
        # trained mode, one reference: also zoomed out and in (core.scale.zoom_view), two more shots
        self.zoom_views = bool(zoom_views)
        # trained mode: objects the model finds in its reference crops beyond partial marks are left out of the
        # background prototypes (set_references); ``found_beyond``: that area per marked pixel, None when not run
        self.exclude_found = bool(exclude_found)
        self.found_beyond: Optional[float] = None
        # trained mode: each target decoded once more with its own confident objects beside the reference
        # (:meth:`.virefsam.ViRefSAM.self_support`); not in set_references' own segmentations of its crops
        # (exclude_found), but in core.choice's check, which predicts as the run will; with one reference crop only
        # (``n_crops``, :attr:`self_support_applies`)
        self.self_support = bool(self_support)
        self.n_crops = 0  # reference crops as given to set_references (its zoomed views not counted)
        self._referencing = False
        self._shots = None
        # tile digest -> plain embedding; pass one OrderedDict to several predictors (other classes, other modes
        # on the same engine) to share the frozen-encoder passes
        self._cache: "OrderedDict[str, _Target]" = OrderedDict() if cache is None else cache
        self.model = None
        if mode == "virefsam" and adapters is None:
            mode = "training_free"
        self.mode = mode
        if mode == "virefsam":
            if isinstance(adapters, ViRefSAM):
                model = adapters
            elif isinstance(adapters, (str, Path)):
                model = _adapters_model(engine, adapters, seed)
            else:
                raise ModelError("Adapters must be a path to a .pt file or a ViRefSAM model.")
            # a model kept by the engine (a second run) is ready: on the device, in eval mode (TinyViT's eval()
            # recomputes its attention biases), with its ONNX Runtime runner (nothing to hash again)
            reused = model is not adapters and model.adapted_runner is not None and not model.training
            dtype = next(self.sam.parameters()).dtype
            self.model = model if reused else model.to(device=self._device(), dtype=dtype).eval()
            self.model.encoder_autocast = getattr(engine, "autocast", None)  # bf16/fp16 for the encoder pass only
            if self.model.use_dta and hasattr(engine, "adapted_encoder") and not reused:
                self.model.adapted_runner = engine.adapted_encoder(self.model.encoder, n_table=1 + model.n_bg)
            if hasattr(engine, "mask_decoder_runner") and not reused:
                self.model.decoder_runner = engine.mask_decoder_runner()
            self.n_bg = model.n_bg
        self._base_model = self.model  # the model as loaded; ``model`` may be a copy tuned on the references
        # ``tune_files`` "vcp_alone": only a file without DTA adapters is tuned (core.params.RunParams.tune_files);
        # "auto" as "vcp_alone" until the check on the reference allows the DTA file (:meth:`tune_dta_file`)
        self.requested_tune_steps = self.tune_steps
        if tune_files in ("vcp_alone", "auto") and (self.model is None or self.model.use_dta):
            self.tune_steps = 0
        self._protos: Optional[Prototypes] = None
        self.n_negatives = 0  # negative prototypes in use (set_references)
        self._neg_rows = 0  # the last _neg_rows background rows of the prototypes are negatives
        self._static: Optional[Tuple[np.ndarray, np.ndarray]] = None

    def tune_dta_file(self, on: bool) -> None:
        """``tune_files`` "auto" decided per reference set (eval): a file with DTA adapters is tuned (``on``) or
        not; a file without DTA keeps its tuning either way."""
        if self.model is not None and self.model.use_dta:
            self.tune_steps = self.requested_tune_steps if on else 0

    # -- helpers ----------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        dev = getattr(self.engine, "device", None)
        return torch.device(dev) if dev is not None else next(self.sam.parameters()).device

    def _encode(self, images: Sequence[np.ndarray]) -> List[_Target]:
        """Preprocess and run the frozen encoder once for all images not in the cache (one batched pass)."""
        keys = [f"{id(self.sam):x}:{_digest(im)}" for im in images]  # the model is part of the key
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        fresh = {}
        if todo:
            pre = [self.engine.preprocess(images[i]) for i in todo]
            xs = torch.cat([p[0] for p in pre])
            # the engine's cache holds plain passes of earlier runs (other classes on the same tiles)
            shared = getattr(self.engine, "embeddings", None)
            known = [shared.get(keys[i]) if shared is not None else None for i in todo]
            stems = None
            if all(k is not None for k in known):
                plain = torch.cat(known).to(self._device())
            else:
                if self.model is not None and self.model.adapted_runner is not None:  # keep the shared stem
                    plain, stems = self.engine.encode_with_stem(xs)
                else:
                    plain = self.engine.encode(xs)
                # the plain pass for later runs (the stem is not kept: 8 MB a tile; the adapted pass of a later
                # run makes its own, about 40% of a plain pass)
                if shared is not None:
                    for j, i in enumerate(todo):
                        shared.put(keys[i], plain[j : j + 1])
            for j, i in enumerate(todo):
                input_size = tuple(int(v) for v in pre[j][1])
                valid = valid_grid(input_size, int(xs.shape[-1]), int(plain.shape[-1]), device=plain.device)
                fresh[keys[i]] = _Target(
                    pre[j][0], input_size, tuple(images[i].shape[:2]), plain[j : j + 1], valid[None],
                    None if stems is None else stems[j : j + 1],
                )
        out = []
        for k in keys:
            t = fresh.get(k) or self._cache[k]
            out.append(t)
            if self.cache_size > 0:
                self._cache[k] = t
                self._cache.move_to_end(k)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return out

    # -- references -------------------------------------------------------------------------------------------
    def set_references(self, references: Sequence[Tuple[np.ndarray, np.ndarray]],
                       negatives: Sequence[Tuple[np.ndarray, np.ndarray]] = ()) -> None:
        """K shots of (image HxWx3 uint8, mask HxW bool); each is encoded once, here.

        ``negatives``: negative examples, (image HxWx3 uint8, region mask HxW bool) of things that are NOT the
        class (e.g. result polygons an analyst marked "Not <class>"). Each connected region becomes one more
        background prototype (:func:`.prototypes.negative_prototypes`, appended by
        :func:`.prototypes.with_negatives`), used by every mode that matches prototypes (ViRefSAM, training-free);
        static prompt reuse has no prototypes and ignores them.

        Trained mode with ``zoom_views`` and one reference: it is also seen zoomed out and in
        (:data:`core.scale.ZOOM_VIEWS`, :func:`core.scale.zoom_view`), two more shots of the K-shot ensemble (K >= 2
        references bring their own variety: no views, which would cost three decodings per tile each); run-time
        tuning learns from the reference as given."""
        refs = list(references)
        if not refs:
            raise InputError("No reference was given: mark at least one example of the class first.")
        images, masks = [], []
        for i, (image, mask) in enumerate(refs, 1):
            image = _check_image(image, f"reference image {i}")
            mask = np.asarray(mask).astype(bool)
            if mask.shape != image.shape[:2]:
                raise InputError(
                    f"Reference {i}: the mask ({mask.shape[1]}x{mask.shape[0]}) does not match its image "
                    f"({image.shape[1]}x{image.shape[0]})."
                )
            if not mask.any():
                raise InputError(f"Reference {i} marks nothing: draw at least one object of the class.")
            images.append(image)
            masks.append(mask)
        originals = (images, masks)  # run-time tuning learns from the references as marked
        self.n_crops = len(images)
        self.found_beyond = None
        self.model = self._base_model
        if self.mode == "static_prompt":
            pts, bxs = zip(*(static_prompts_from_mask(m, self.max_prompts) for m in masks))
            self._static = (np.concatenate(pts)[: self.max_prompts], np.concatenate(bxs)[: self.max_prompts])
            self._protos = self._shots = None
            return
        self._build(images, masks, None, negatives)
        self._referencing = True  # the reference crops' own segmentations below: without self-support
        try:
            self._reference_work(images, masks, negatives, originals)
        finally:
            self._referencing = False

    def _reference_work(self, images, masks, negatives, originals) -> None:
        """:meth:`set_references` after the first prototypes: ``exclude_found`` and run-time tuning."""
        if self.exclude_found and self.mode == "virefsam":
            found = [unmarked_found(self.predict(im), m) for im, m in zip(images, masks)]
            self.found_beyond = float(sum(int(f.sum()) for f in found) / max(1, sum(int(m.sum()) for m in masks)))
            if self.found_beyond > PARTIAL_MARKS:
                self._build(images, masks, found, negatives)
        if self.tune_steps > 0 and self.mode == "virefsam":
            self.model = self._tuned(*originals)

    def _build(self, images: List[np.ndarray], masks: List[np.ndarray], found: Optional[List[np.ndarray]],
               negatives) -> None:
        """The prototypes of :meth:`set_references` (joint, and each shot's for the K-shot ensemble). ``found``:
        per reference, the objects the model finds beyond the marks (:func:`unmarked_found`): cells covered at
        least :data:`FOUND_CELL` by them and not marked are no background cells (an unmarked house is not
        background). The trained mode's zoomed views of one reference are added here, ``found`` with them."""
        if self.zoom_views and self.mode == "virefsam" and len(images) == 1:
            for z in ZOOM_VIEWS:
                both = images[0] if found is None else np.dstack([images[0], found[0].astype(np.uint8)])
                v = zoom_view(both, masks[0], z)
                if v is not None:
                    images, masks = images + [np.ascontiguousarray(v[0][..., :3])], masks + [v[1]]
                    if found is not None:
                        found = found + [v[0][..., 3] > 0]
        with torch.inference_mode():
            self._shots = None
            targets = [self._encode([im])[0] for im in images]  # one at a time: K x 12 MB inputs at most
            feats = torch.cat([t.plain for t in targets])
            grid = feats.shape[-1]

            def fractions(ms):
                return torch.stack([mask_fraction_grid(m, t.input_size, int(t.x.shape[-1]), grid)
                                    for m, t in zip(ms, targets)]).to(feats.device, feats.dtype)

            frac = fractions(masks)
            valid = torch.cat([t.valid for t in targets])
            if found is not None:
                valid = valid & ~((fractions(found) >= FOUND_CELL) & (frac <= 0))
            self._protos = build_prototypes(feats, frac, valid, self.n_bg, self.seed, per_shot=self.bg_per_shot)
            self.n_negatives = self._neg_rows = 0
            if negatives:
                neg, neg_valid = self._negative_rows(negatives)
                self._protos = with_negatives(self._protos, neg, neg_valid)
                self.n_negatives, self._neg_rows = int(neg_valid.sum()), int(neg.shape[0])
            # K-shot ensemble (trained mode): each shot's own prototypes too (ViRefSAM.forward's ``shots``)
            if self.kshot == "ensemble" and self.mode == "virefsam" and len(images) > 1:
                self._shots = [build_prototypes(feats[k : k + 1], frac[k : k + 1], valid[k : k + 1], self.n_bg,
                                                self.seed) for k in range(len(images))]
                if negatives and self._neg_rows:
                    self._shots = [with_negatives(p, neg, neg_valid) for p in self._shots]

    def _tuned(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> ViRefSAM:
        """A copy of the model with VCP tuned on the references (:func:`.tune.tune_vcp`); K <= 2 references are
        joined by their horizontal and vertical flips, each encoded by the frozen encoder."""
        from .tune import TuneView, tune_vcp

        views = []
        for k, (image, mask) in enumerate(zip(images, masks)):
            variants = [(image, mask, False)]
            if len(images) <= 2:
                variants += [(image[:, ::-1], mask[:, ::-1], True), (image[::-1], mask[::-1], True)]
            for im, m, flipped in variants:
                im, m = np.ascontiguousarray(im), np.ascontiguousarray(m)
                with torch.inference_mode():
                    t = self._encode([im])[0]
                size, grid, dev = int(t.x.shape[-1]), int(t.plain.shape[-1]), t.plain.device
                dtype = t.plain.dtype
                views.append(TuneView(
                    x=t.x.clone(), plain=t.plain.clone(), valid=t.valid.clone(),
                    frac64=mask_fraction_grid(m, t.input_size, size, grid)[None].to(dev, dtype),
                    frac256=mask_fraction_grid(m, t.input_size, size, 4 * grid)[None].to(dev, dtype),
                    keep256=valid_grid(t.input_size, size, 4 * grid, device=dev)[None].to(dtype),
                    shot=k, flipped=flipped, stem=None if t.stem is None else t.stem.clone()))
        return tune_vcp(self._base_model, views, steps=self.tune_steps, lr=self.tune_lr, seed=self.seed,
                        progress=self.tune_progress, ignore_found=self.tune_ignore_found)

    MAX_NEGATIVE_REGIONS = 64  # per negative example crop: the largest regions

    def _negative_rows(self, negatives) -> Tuple[torch.Tensor, torch.Tensor]:
        """R x C prototypes (and validity) of the connected regions of the negative examples' masks."""
        from scipy import ndimage

        rows, oks = [], []
        for i, (image, mask) in enumerate(negatives, 1):
            image = _check_image(image, f"negative example {i}")
            mask = np.asarray(mask).astype(bool)
            if mask.shape != image.shape[:2]:
                raise InputError(f"Negative example {i}: the mask does not match its image.")
            labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
            if n == 0:
                continue
            areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            ids = 1 + np.argsort(-areas, kind="stable")[: self.MAX_NEGATIVE_REGIONS]
            t = self._encode([image])[0]
            grid = t.plain.shape[-1]
            fracs = torch.stack([mask_fraction_grid(labels == k, t.input_size, int(t.x.shape[-1]), grid)
                                 for k in ids]).to(t.plain.device, t.plain.dtype)
            feats = t.plain.expand(len(ids), -1, -1, -1)
            p, ok = negative_prototypes(feats, fracs, t.valid.expand(len(ids), -1, -1))
            rows.append(p)
            oks.append(ok)
        if not rows:
            dev = self._device()
            return torch.zeros(0, self._protos.fg.shape[-1], device=dev), torch.zeros(0, dtype=torch.bool, device=dev)
        return torch.cat(rows), torch.cat(oks)

    def reference_state(self) -> dict:
        """What :meth:`set_references` computed, as plain CPU numpy arrays (no project class inside), so that
        another process (a Dask worker, :mod:`core.cluster`) can predict with it after
        :meth:`load_reference_state` instead of encoding the references again."""
        if self._static is not None:
            return {"mode": self.mode, "points": self._static[0], "boxes": self._static[1]}
        if self._protos is None:
            raise InputError("Set the references before predicting.")
        state = {"mode": self.mode, "neg_rows": self._neg_rows, "crops": self.n_crops,
                 **_proto_arrays(self._protos)}
        if self._shots is not None:  # the K-shot ensemble's per-shot prototypes
            state["shots"] = [_proto_arrays(p) for p in self._shots]
        if self.model is not None and self.model is not self._base_model:  # VCP tuned on the references
            state["vcp"] = {k: v.detach().to("cpu").numpy() for k, v in self.model.vcp.state_dict().items()}
        return state

    def load_reference_state(self, state: dict) -> None:
        """The references of :meth:`reference_state` (of a predictor of the same model and mode), on this
        predictor's device: the same predictions as after that predictor's :meth:`set_references`."""
        if state.get("mode") != self.mode:
            raise ModelError(f"The reference was prepared for the mode '{state.get('mode')}', not '{self.mode}'.")
        if "points" in state:
            self._static, self._protos = (np.asarray(state["points"]), np.asarray(state["boxes"])), None
            self._shots = None
            return
        dev, dtype = self._device(), next(self.sam.parameters()).dtype
        self._protos = _proto_tensors(state, dev, dtype)
        shots = state.get("shots")
        self._shots = [_proto_tensors(p, dev, dtype) for p in shots] if shots else None
        self._neg_rows = int(state.get("neg_rows", 0))
        self.n_crops = int(state.get("crops", 1))
        self.model = self._base_model
        if state.get("vcp") is not None and self.model is not None:  # the tuned VCP of the run's references
            import copy

            from .tune import with_vcp

            vcp = copy.deepcopy(self.model.vcp)
            vcp.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state["vcp"].items()})
            self.model = with_vcp(self.model, vcp.eval())
        first_neg = self._protos.n_bg - self._neg_rows
        self.n_negatives = int(self._protos.bg_valid[0, first_neg:].sum()) if self._neg_rows else 0
        self._static = None

    # -- prediction -------------------------------------------------------------------------------------------
    @property
    def self_support_applies(self) -> bool:
        """Targets are decoded with self-support now: asked for, trained mode, not the reference's own work, and
        one reference crop. With several crops the K-shot ensemble's decoding stays the result: self-support's one
        decoding from the fused prototypes would replace the ensemble of the crops' own decodings, and on the three
        NWPU folds 5-shot fell from 28.4 to 26.4 mIoU with it, below 1-shot (26.6); averaging the two gave 27.3
        (model card, "Session 22")."""
        return self.self_support and self.mode == "virefsam" and not self._referencing and self.n_crops == 1

    def _low_res(self, t: _Target) -> torch.Tensor:
        # the baselines decode many prompts per tile: under the engine's precision (bf16 / fp16), like its encoder
        if self.mode == "static_prompt":
            pts, bxs = self._static
            with self.engine.autocast():
                return static_prompt_logits(self.sam, t.plain, pts, bxs, t.input_size, self.use_box).float()
        if self.mode == "training_free":
            with self.engine.autocast():
                low, _ = training_free_logits(
                    self.sam, t.plain, self._protos, t.valid, self.max_prompts, self.use_box,
                    window_margin=self.window_margin, context=self.decoder_context,
                )
            return low.float()
        out = self.model(t.x, self._protos, plain=t.plain, valid=t.valid, stem=t.stem, shots=self._shots)
        return self._with_self_support(t, out["low_res_logits"][:, :1], out["embedding"])

    def _with_self_support(self, t: _Target, low: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The trained mode's last steps on a tile's first decoding ``low`` (1 x 1 x 256 x 256) and adapted
        embedding: what the analyst marked "not this class" goes (the components of the mask more like a negative
        example), then self-support, and what the negatives filter took stays out of it. The negatives are
        background rows of its decoding too; with negatives, self-support's own foreground leaves out the cells
        more like a negative example than like the class (:func:`.prototypes.negative_cells`), the filtered
        places stay empty, and the objects self-support adds where the first decoding had none go through the
        negatives' filter once more. Kampala corrections window, five negatives, self-support on: IoU 0.523 ->
        0.552 and 1 of the 5 marked places back (before session 21: 0.545 and 2 back; filtering every pixel it
        adds in a negative-like cell: 0.420, none back; its added pixels as components: 0.409; without
        self-support: 0 back), which is one reason self-support stays opt-in."""
        drop = None
        if self._neg_rows:
            drop = negative_components(t.plain, low, self._protos, self._neg_rows, t.valid).to(low.device)
            low = low.masked_fill(drop[None, None], NO_MASK_LOGIT)
        if not self.self_support_applies:
            return low
        if drop is None:
            return self.model.self_support(low, self._protos, t.plain, emb, t.valid)
        unlike = negative_cells(t.plain, self._protos, self._neg_rows, t.valid)
        first = (low[0, 0] > 0).cpu().numpy()
        low = self.model.self_support(low, self._protos, t.plain, emb, t.valid, exclude=unlike)
        new = unmarked_found((low[0, 0] > 0).cpu().numpy().astype(np.float32), first)  # objects touching none
        only_new = low.masked_fill(~torch.from_numpy(new).to(low.device)[None, None], NO_MASK_LOGIT)
        again = negative_components(t.plain, only_new, self._protos, self._neg_rows, t.valid).to(low.device)
        return low.masked_fill((drop | again)[None, None], NO_MASK_LOGIT)

    def predict_batch(self, images: Sequence[np.ndarray]) -> List[np.ndarray]:
        """HxW float32 probabilities in [0, 1] for each tile (one batched frozen-encoder pass for the batch)."""
        if self._protos is None and self._static is None:
            raise InputError("Set the references before predicting.")
        images = [_check_image(im, "target tile") for im in images]
        outs = []
        with torch.inference_mode():
            for t in self._encode(images):
                low = self._low_res(t)
                logits = self.engine.postprocess(low.float(), t.input_size, t.original_size)
                outs.append(torch.sigmoid(logits[0, 0].float()).cpu().numpy().astype(np.float32))
        return outs

    def predict(self, image: np.ndarray) -> np.ndarray:
        """HxW float32 probability in [0, 1] that each pixel of the tile belongs to the class."""
        return self.predict_batch([image])[0]
