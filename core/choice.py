"""How much each shipped adapters file counts for the analyst's class: a check on the reference (``adapters="auto"``).

Two files are shipped for the embedded model (see ``resources/adapters/MODEL_CARD.md``): the VCP + DTA file that
finds buildings and land cover (``embedded_virefsam.pt``), and a VCP-alone file trained with three references
per episode that finds compact objects of NWPU-like imagery better and buildings badly
(``embedded_virefsam_objects.pt``). Neither is best for every class, and the class is only known through its
reference. So each candidate segments the reference crops: several crops each from the others (leave-one-out);
one crop from itself and, since every file finds what it was just shown, also as a view it was not given (the crop
mirrored and at 0.75x, :func:`altered_view`; session 14), the two IoUs averaged. The score is the IoU with the
marks of the predicted objects that touch a marked object; objects found elsewhere in a crop are left out, since
an analyst marks a few of many. The scores become weights
(:func:`blend_weights`: a softmax at temperature :data:`TEMPERATURE`; a file under :data:`FLOOR` is left out and
the rest renormalised), and the run averages the kept files' probabilities with them
(:class:`core.modeling.blend.BlendedPredictor`). A file left out costs nothing per tile: most runs use one file.
The check runs every file as loaded; afterwards a kept file without DTA (the objects file) is tuned on the
references by default (``RunParams.tune_files``, session 15).

Measured with ``eval --adapters A.pt,B.pt`` (model card): three NWPU folds 1-shot 29.3 mIoU with the altered
view (28.2 without it, 26.3 when the check picked one file, 21.3 for the default file alone); the OAM building
collages 55.9 (56.5 for the default file alone), the 256-px OAM tiles 38.5 (36.7 without the view); both demo
references keep the default file alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import numpy as np

Shot = Tuple[np.ndarray, np.ndarray]  # (H x W x 3 uint8 image, H x W bool mask)

# chosen on the measured episodes (model card): temperatures 0.03, 0.05, 0.1, 0.2 with score offsets -0.1 ... 0.15,
# floors 0, 0.05, 0.1, 0.2 were compared
TEMPERATURE = 0.05
FLOOR = 0.1
ALTERED_SCALE = 0.75  # the one-crop check's other view: mirrored and resized by this (session 14)
# tune_files "auto": the marks count as complete (every object of the class in the crops marked) when the kept
# files find at most this much foreground beyond them, per marked pixel (session 17)
COMPLETE_OUTSIDE = 1.0


def touching_iou(prob: np.ndarray, marks: np.ndarray, threshold: float = 0.5) -> Tuple[int, int]:
    """(intersection, union) of the marks and the predicted 8-connected objects that touch a marked pixel.
    prob: H x W probabilities; marks: H x W bool."""
    return touching_counts(prob, marks, threshold)[:2]


def touching_counts(prob: np.ndarray, marks: np.ndarray, threshold: float = 0.5) -> Tuple[int, int, int, int]:
    """(intersection, union, outside, marked): :func:`touching_iou`'s two counts, the predicted pixels in objects
    that touch no mark (what the file finds beyond the marks: other objects of the class when the analyst marked a
    few of many, or its false positives) and the marked pixels."""
    from .modeling.reference_prototypes import unmarked_found

    outside = unmarked_found(prob, marks, threshold)
    kept = (prob > threshold) & ~outside
    return (int((kept & marks).sum()), int((kept | marks).sum()), int(outside.sum()),
            int(marks.sum()))


@dataclass(frozen=True)
class Check:
    """One file's check on the reference crops: ``iou`` of the marked objects (:func:`reference_check`) and
    ``outside``, the foreground it finds in objects touching no mark per marked pixel (0: nothing beyond the
    marks; 3: three times the marked area)."""

    iou: float
    outside: float


def altered_view(image: np.ndarray, mask: np.ndarray, scale: float = ALTERED_SCALE) -> Shot:
    """The crop mirrored left-right and resized by ``scale`` (bilinear; the mask nearest): the other view a
    one-crop check also segments."""
    from PIL import Image

    h, w = mask.shape
    size = (max(32, int(w * scale)), max(32, int(h * scale)))
    img = np.asarray(Image.fromarray(np.ascontiguousarray(image[:, ::-1])).resize(size, Image.BILINEAR))
    marks = np.asarray(Image.fromarray(mask[:, ::-1].astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    return img, marks


def reference_check(predictor, shots: Sequence[Shot]) -> float:
    """How well ``predictor`` (a ReferencePredictor) finds the marked objects of its own reference crops: several
    crops each segmented from the others, the pixel IoU over all crops. One crop has no other: it is segmented
    from itself, which every file does well, and also, as a view it was not given, mirrored and at 0.75x
    (:func:`altered_view`); the check is the mean of both IoUs. 0 when nothing is marked. The check runs the file
    as loaded: run-time tuning (``tune_steps``) and ``exclude_found`` are held off, then restored. Leaves the
    predictor with the last crop's references: set them again before use."""
    return check_reference(predictor, shots).iou


def check_reference(predictor, shots: Sequence[Shot]) -> Check:
    """:func:`reference_check` with what the file finds beyond the marks (:class:`Check`), from the same
    predictions."""
    steps = getattr(predictor, "tune_steps", 0)
    exclude = getattr(predictor, "exclude_found", False)
    predictor.tune_steps = 0  # tuned on the crops it is checked on, every file would find them
    predictor.exclude_found = False  # the file as loaded; it also measures what exclude_found would use
    try:
        return _check(predictor, shots)
    finally:
        predictor.tune_steps, predictor.exclude_found = steps, exclude


def _check(predictor, shots: Sequence[Shot]) -> Check:
    if len(shots) == 1:
        image, mask = shots[0]
        predictor.set_references(list(shots))
        mask = mask.astype(bool)
        seen = touching_counts(predictor.predict(image), mask)
        view, view_mask = altered_view(image, mask)
        other = touching_counts(predictor.predict(view), view_mask)
        return Check(iou=(_iou(*seen[:2]) + _iou(*other[:2])) / 2,
                     outside=(_ratio(seen[2], seen[3]) + _ratio(other[2], other[3])) / 2)
    total = np.zeros(4, dtype=np.int64)
    for i, (image, mask) in enumerate(shots):
        predictor.set_references([s for j, s in enumerate(shots) if j != i])
        total += touching_counts(predictor.predict(image), mask.astype(bool))
    return Check(iou=_iou(int(total[0]), int(total[1])), outside=_ratio(int(total[2]), int(total[3])))


def _ratio(outside: int, marked: int) -> float:
    return outside / marked if marked else 0.0


def _iou(inter: int, union: int) -> float:
    return inter / union if union else 0.0


def blend_weights(scores: Sequence[float], temperature: float = TEMPERATURE, floor: float = FLOOR) -> List[float]:
    """The candidates' weights (summing to 1) from their check scores: a softmax at ``temperature``; weights under
    ``floor`` become 0 and the rest are renormalised (the best candidate always keeps a weight)."""
    s = np.asarray(scores, dtype=np.float64)
    w = np.exp((s - s.max()) / temperature)
    w /= w.sum()
    w[w < floor] = 0.0
    return [float(v) for v in w / w.sum()]


def weigh(candidates: Sequence, make: Callable[[object], object], shot_sets: Sequence[Sequence[Shot]]
          ) -> Tuple[List[float], List[float]]:
    """(weights by :func:`blend_weights`, scores by :func:`reference_check`, the mean over ``shot_sets``, one per
    class) of every candidate. ``make(candidate)`` gives a ReferencePredictor with those adapters (the pipeline:
    candidates are file paths; eval: indices of predictors it keeps)."""
    weights, checks = weigh_checks(candidates, make, shot_sets)
    return weights, [c.iou for c in checks]


def weigh_checks(candidates: Sequence, make: Callable[[object], object], shot_sets: Sequence[Sequence[Shot]]
                 ) -> Tuple[List[float], List[Check]]:
    """:func:`weigh` with each candidate's whole :class:`Check` (both numbers the mean over ``shot_sets``)."""
    checks = []
    for path in candidates:
        pred = make(path)
        found = [check_reference(pred, shots) for shots in shot_sets if shots] or [Check(0.0, 0.0)]
        checks.append(Check(iou=float(np.mean([c.iou for c in found])),
                            outside=float(np.mean([c.outside for c in found]))))
        del pred
    return blend_weights([c.iou for c in checks]), checks


def beyond_marks(weights: Sequence[float], checks: Sequence[Check]) -> float:
    """The kept files' foreground beyond the marks per marked pixel (:attr:`Check.outside`), weighted as blended."""
    total = sum(w for w in weights if w > 0)
    return float(sum(w * c.outside for w, c in zip(weights, checks) if w > 0) / total) if total else 0.0


def marks_complete(weights: Sequence[float], checks: Sequence[Check], limit: float = COMPLETE_OUTSIDE) -> bool:
    """Whether the reference marks look complete, every object of the class in its crops marked: the files the
    blend keeps find at most ``limit`` times the marked area beyond the marks (an analyst who marked 4 houses of
    30 gets about 6x). ``tune_files`` "auto" then tunes the DTA file on the references too: with partial marks,
    tuning learns the unmarked objects as background (model card)."""
    return beyond_marks(weights, checks) <= limit
