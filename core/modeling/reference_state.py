"""A predictor's references as plain data: ``reference_state`` / ``load_reference_state``.

:class:`ReferenceState` is a mixin of :class:`.predictor.ReferencePredictor`: what ``set_references`` computed
(the prototypes, the K-shot ensemble's per-shot prototypes, the static prompts, a VCP tuned on the references) as
CPU numpy arrays with no project class inside, so that another process (a Dask worker, :mod:`core.cluster`) can
predict with them without encoding the references again.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError, ModelError
from .prototypes import Prototypes


_PROTO_FIELDS = ("fg", "fg_valid", "bg", "bg_valid")


def _proto_arrays(p: Prototypes) -> dict:
    """Prototypes as plain CPU numpy arrays (:meth:`ReferencePredictor.reference_state`)."""
    return {k: getattr(p, k).detach().cpu().numpy() for k in _PROTO_FIELDS}


def _proto_tensors(arrays: dict, dev: torch.device, dtype: torch.dtype) -> Prototypes:
    """:func:`_proto_arrays` back as Prototypes on ``dev`` (features in ``dtype``, validity as it was)."""
    t = {k: torch.from_numpy(np.asarray(arrays[k])) for k in _PROTO_FIELDS}
    return Prototypes(t["fg"].to(dev, dtype), t["fg_valid"].to(dev), t["bg"].to(dev, dtype), t["bg_valid"].to(dev))


class ReferenceState:
    """The reference state of :class:`.predictor.ReferencePredictor` (a mixin; see the module doc)."""

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
