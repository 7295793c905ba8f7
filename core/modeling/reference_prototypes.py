"""How a predictor's references become prototypes: ``set_references``.

:class:`ReferencePrototypes` is a mixin of :class:`.predictor.ReferencePredictor` (it uses the predictor's
settings, ``_encode`` of :class:`.tile_encoding.TileEncoding` and ``predict``): the K shots are checked and
encoded once, the joint prototypes built and, for the K-shot ensemble (trained mode, K > 1 or one reference with
its zoomed views), each shot's own; negative examples become more background rows; ``exclude_found`` rebuilds them
without the objects the model finds beyond partial marks (:func:`unmarked_found`); run-time tuning gives a copy of
the model tuned on the references. Also the reference mask on the embedding grid (:func:`mask_fraction_grid`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..scale import ZOOM_VIEWS, zoom_view
from .prototypes import GRID, build_prototypes, negative_prototypes, valid_grid, with_negatives
from .tile_encoding import _check_image
from .training_free import static_prompts_from_mask
from .virefsam import ViRefSAM


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


class ReferencePrototypes:
    """The references of :class:`.predictor.ReferencePredictor` (a mixin; see the module doc)."""

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
