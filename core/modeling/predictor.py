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

The predictor is assembled from mixins, one file each: :mod:`.tile_encoding` (the input check and the cached
frozen-encoder pass), :mod:`.reference_prototypes` (``set_references``: prototypes, the K-shot ensemble's per-shot
ones, negatives, ``exclude_found``, run-time tuning) and :mod:`.reference_state` (the references as plain data for
another process); this file holds the settings and the prediction (modes, negatives filter, self-support).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import InputError, ModelError
from ..scale import ZOOM_VIEWS
from .prototypes import Prototypes, negative_cells, negative_components
from .reference_prototypes import (  # noqa: F401  (mask_fraction_grid, FOUND_CELL, PARTIAL_MARKS: named here before)
    FOUND_CELL,
    PARTIAL_MARKS,
    ReferencePrototypes,
    mask_fraction_grid,
    unmarked_found,
)
from .reference_state import ReferenceState
from .tile_encoding import TileEncoding, _check_image, _Target
from .training_free import (
    DEFAULT_CONTEXT,
    DEFAULT_WINDOW_MARGIN,
    NO_MASK_LOGIT,
    static_prompt_logits,
    training_free_logits,
)
from .virefsam import ViRefSAM

MODES = ("virefsam", "training_free", "static_prompt")
KSHOTS = ("ensemble", "joint")


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


class ReferencePredictor(ReferencePrototypes, ReferenceState, TileEncoding):
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
