"""Several adapters files on one frozen SAM, their probabilities averaged with fixed weights.

    blend = BlendedPredictor([pred_a, pred_b], [0.7, 0.3])   # ReferencePredictors sharing one engine and cache
    blend.set_references(shots)                              # each file's prototypes from the same crops
    prob = blend.predict(tile)                               # 0.7 * p_a + 0.3 * p_b, H x W float32

The weights come from the check on the reference (:mod:`core.choice`); the pipeline writes them into the run's
parameters (``ModelParams.adapter_weights``), so a replay or a Dask worker builds the same blend without checking
again. The member predictors share one cache of plain (frozen-encoder) embeddings: a tile's plain pass runs once
for all files; each file adds its own adapted pass (when it has DTA), VCP and decodings.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np


class BlendedPredictor:
    """The weighted mean of several ReferencePredictors' probabilities (same interface as one)."""

    model = None  # no single adapted model: the several-class shared adapted pass does not apply

    def __init__(self, predictors: Sequence, weights: Sequence[float]) -> None:
        if len(predictors) != len(weights) or not predictors:
            raise ValueError("one weight per predictor, at least one")
        total = float(sum(weights))
        self.predictors = list(predictors)
        self.weights: List[float] = [float(w) / total for w in weights]
        self.mode = self.predictors[0].mode
        self.requested_mode = getattr(self.predictors[0], "requested_mode", self.mode)
        self.tune_steps = max(getattr(p, "tune_steps", 0) for p in self.predictors)

    @property
    def tune_progress(self):
        return self.predictors[0].tune_progress

    @tune_progress.setter
    def tune_progress(self, fn) -> None:
        for p in self.predictors:
            p.tune_progress = fn

    @property
    def n_negatives(self) -> int:
        return getattr(self.predictors[0], "n_negatives", 0)

    def set_references(self, references, negatives=()) -> None:
        for p in self.predictors:
            p.set_references(references, negatives)

    def _mix(self, probs: Sequence[np.ndarray]) -> np.ndarray:
        out = np.zeros_like(probs[0], dtype=np.float32)
        for w, p in zip(self.weights, probs):
            out += np.float32(w) * p
        return out

    def predict(self, image: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 -> H x W float32 in [0, 1]: the weighted mean of the members' probabilities."""
        return self._mix([p.predict(image) for p in self.predictors])

    def predict_batch(self, images: Sequence[np.ndarray]) -> List[np.ndarray]:
        each = [p.predict_batch(images) for p in self.predictors]
        return [self._mix([e[i] for e in each]) for i in range(len(images))]

    def reference_state(self) -> dict:
        """Every member's :meth:`ReferencePredictor.reference_state` and the weights (plain data)."""
        return {"blend": [p.reference_state() for p in self.predictors], "weights": list(self.weights)}

    def load_reference_state(self, state: dict) -> None:
        for p, s in zip(self.predictors, state["blend"]):
            p.load_reference_state(s)
