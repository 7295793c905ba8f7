"""Timers around one ``pipeline.run`` (engine methods, module hooks, the predictor class): no change to the
model code."""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np



class Probe:
    """Install timers for one ``pipeline.run`` on ``engine``: ``with Probe(engine) as probe: pipeline.run(...)``.

    ``seconds[(phase, part)]`` / ``calls[(phase, part)]``: phase ``reference`` (set_references, scribble
    densifying, the adapters check of ``adapters="auto"``) or ``tiles`` (predict); parts ``encode``
    (SamEngine.encode / encode_with_stem, the frozen encoder pass),
    ``encoder_adapted`` (ViRefSAM's DTA encoder pass), ``vcp`` (VCPEncoder.refine/queries/mask_logits),
    ``decoder`` (SAM mask decoder; in the training-free and static-prompt modes the whole
    ``training_free.decode_prompts`` call, prompt encoder included, whose shared-image decoder does not go
    through the decoder module's forward), ``prompt_encoder``, ``preprocess``, ``postprocess``.
    ``encodes``: (phase, digest of the input) of every encoder call.
    ``max_tiles``: bench-only; after that many tiles went through the model, later tiles get the earlier tiles'
    probabilities (cycled) without running the model.
    """

    def __init__(self, engine, max_tiles: Optional[int] = None) -> None:
        self.engine = engine
        self.max_tiles = max_tiles
        self.seconds: Dict[Tuple[str, str], float] = defaultdict(float)
        self.calls: Dict[Tuple[str, str], int] = defaultdict(int)
        self.encodes: List[Tuple[str, str]] = []
        self.phase = "reference"
        self.checking = False  # inside core.choice.reference_check (adapters auto)
        self.model_tiles = 0
        self.reused_tiles = 0
        self.mode = None
        self.timed_models: set = set()  # ids of ViRefSAM models whose parts are timed (once each)
        self._probs: List[np.ndarray] = []
        self._undo: List[Callable[[], None]] = []
        self._in_decode = 0  # inside training_free.decode_prompts: the module hooks are not counted again
        self.overhead: Dict[str, float] = defaultdict(float)  # the probe's own bookkeeping, per phase
        self._inside: Dict[str, int] = defaultdict(int)  # depth of ``outermost`` wrappers per part
        self.adapted_stem: Dict[Tuple[str, bool], int] = defaultdict(int)  # ORT adapted calls: (phase, stem given)

    def _sync(self) -> None:
        import torch

        if getattr(self.engine, "device", None) is not None and self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)

    def _add(self, part: str, dt: float) -> None:
        self.seconds[(self.phase, part)] += dt
        self.calls[(self.phase, part)] += 1

    def _timed(self, part: str, fn: Callable) -> Callable:
        probe = self

        def timed(*a, **k):
            probe._sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                probe._sync()
                probe._add(part, time.perf_counter() - t0)

        return timed

    def wrap(self, obj, name: str, part: str, before: Optional[Callable] = None, outermost: bool = False) -> None:
        """Time ``obj.name`` as ``part`` (``before`` runs first, outside the timer). ``outermost``: a call made
        inside another ``outermost`` wrapper of the same part is neither timed nor passed to ``before`` again."""
        had = name in obj.__dict__
        prev = obj.__dict__.get(name)
        fn = getattr(obj, name)
        timed = self._timed(part, fn)
        if before is not None:
            inner = timed

            def timed(*a, **k):  # noqa: F811
                before(*a, **k)
                return inner(*a, **k)

        if outermost:
            counted = timed

            def timed(*a, **k):  # noqa: F811
                if self._inside[part]:
                    return fn(*a, **k)
                self._inside[part] += 1
                try:
                    return counted(*a, **k)
                finally:
                    self._inside[part] -= 1

        timed.timing_only = True  # type: ignore[attr-defined]  # SamEngine.encode_with_stem reads this
        setattr(obj, name, timed)

        def undo():
            if had:
                setattr(obj, name, prev)
            else:
                obj.__dict__.pop(name, None)

        self._undo.append(undo)

    def hook(self, module, part: str) -> None:
        stack: List[float] = []

        def pre(m, a):
            if self._in_decode:
                return
            self._sync()
            stack.append(time.perf_counter())

        def post(m, a, out):
            if self._in_decode:
                return
            self._sync()
            self._add(part, time.perf_counter() - stack.pop())

        self._undo += [module.register_forward_pre_hook(pre).remove, module.register_forward_hook(post).remove]

    def _record_encode(self, x, *a, **k) -> None:
        """Which input each encoder call saw (a digest of every 8th pixel: enough to tell tiles apart). Its own
        time is the probe's, not the pipeline's: kept in ``overhead`` and taken out of the e2e split."""
        t0 = time.perf_counter()
        t = x.detach()[..., ::8, ::8].cpu().contiguous()
        self.encodes.append((self.phase, hashlib.blake2b(t.numpy().tobytes(), digest_size=8).hexdigest()))
        self.overhead[self.phase] += time.perf_counter() - t0

    def _record_stem(self, x, ctx, stem=None) -> None:
        """Whether the ORT adapted pass got the plain pass's stem tokens (else it computes them again)."""
        self.adapted_stem[(self.phase, stem is not None)] += 1

    def __enter__(self) -> "Probe":
        from ..modeling import predictor as predictor_module

        eng = self.engine
        # the frozen pass: SamEngine.encode, and encode_with_stem (the ViRefSAM path, which hands the stem's tokens
        # to the adapted pass); the outer call of the two is timed and recorded once, and both wrappers say they
        # only time, so the engine still shares the stem (else the bench would time a second stem pass)
        for name in ("encode", "encode_with_stem"):
            if hasattr(eng, name):
                self.wrap(eng, name, "encode", before=self._record_encode, outermost=True)
        self.wrap(eng, "preprocess", "preprocess")
        self.wrap(eng, "postprocess", "postprocess")
        self.hook(eng.sam.mask_decoder, "decoder")
        self.hook(eng.sam.prompt_encoder, "prompt_encoder")
        from ..modeling import training_free as tf_module

        decode_prompts = tf_module.decode_prompts
        timed_decode = self._timed("decoder", decode_prompts)

        def decode(*a, **k):
            self._in_decode += 1
            try:
                return timed_decode(*a, **k)
            finally:
                self._in_decode -= 1

        tf_module.decode_prompts = decode
        self._undo.append(lambda: setattr(tf_module, "decode_prompts", decode_prompts))
        base = predictor_module.ReferencePredictor
        probe = self

        class TimedPredictor(base):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                probe.mode = self.mode
                # several classes: the predictors share one ViRefSAM model; its parts are timed once
                if self.model is not None and id(self.model) not in probe.timed_models:
                    probe.timed_models.add(id(self.model))
                    probe.hook(self.model.encoder, "encoder_adapted")  # the adapted pass in PyTorch
                    if getattr(self.model, "adapted_runner", None) is not None:  # ... or in ONNX Runtime
                        probe.wrap(self.model, "adapted_runner", "encoder_adapted", before=probe._record_stem)
                    if getattr(self.model, "decoder_runner", None) is not None:  # the decoder in ONNX Runtime
                        probe.wrap(self.model, "decoder_runner", "decoder")
                    for name in ("refine", "queries", "mask_logits"):
                        if hasattr(self.model.vcp, name):
                            probe.wrap(self.model.vcp, name, "vcp")

            def set_references(self, references, negatives=()):
                # its own predictions (exclude_found segments the reference crops) are reference work, no tile
                probe.phase, checking, probe.checking = "reference", probe.checking, True
                try:
                    return super().set_references(references, negatives)
                finally:
                    probe.checking = checking

            def predict_batch(self, images):
                if probe.checking:  # the check (adapters auto) or set_references segments reference crops: no tile
                    return super().predict_batch(images)
                probe.phase = "tiles"
                if probe.max_tiles is not None and probe.model_tiles >= probe.max_tiles:
                    return [probe._reuse(im) for im in images]
                outs = super().predict_batch(images)
                probe.model_tiles += len(images)
                if probe.max_tiles is not None and len(probe._probs) < 8:
                    probe._probs += [o.copy() for o in outs]
                return outs

        predictor_module.ReferencePredictor = TimedPredictor
        self._undo.append(lambda: setattr(predictor_module, "ReferencePredictor", base))
        from ..modeling import joint_dta as joint_module

        joint_predict = joint_module.predict_classes

        def predict_classes(predictors, image):  # several trained classes, one adapted pass (pipeline)
            probe.phase = "tiles"
            if probe.max_tiles is not None and probe.model_tiles >= probe.max_tiles:
                return np.stack([probe._reuse(image) for _ in predictors])
            out = joint_predict(predictors, image)
            probe.model_tiles += len(predictors)  # as one predict_batch call per class would count
            if probe.max_tiles is not None and len(probe._probs) < 8:
                probe._probs += [o.copy() for o in out]
            return out

        joint_module.predict_classes = predict_classes
        self._undo.append(lambda: setattr(joint_module, "predict_classes", joint_predict))
        from .. import choice as choice_module

        check = choice_module.check_reference  # what reference_check and the pipeline's weighing call

        def check_reference(predictor, shots):  # adapters auto: timed as reference work, not as tiles
            probe.phase, probe.checking = "reference", True
            try:
                return check(predictor, shots)
            finally:
                probe.checking = False

        choice_module.check_reference = check_reference
        self._undo.append(lambda: setattr(choice_module, "check_reference", check))
        from .. import pipeline as pipeline_module

        if "ReferencePredictor" in vars(pipeline_module):  # imported at module level (not the case today)
            prev = pipeline_module.ReferencePredictor
            pipeline_module.ReferencePredictor = TimedPredictor
            self._undo.append(lambda: setattr(pipeline_module, "ReferencePredictor", prev))
        return self

    def _reuse(self, image: np.ndarray) -> np.ndarray:
        from ..tiling import resize_bilinear

        self.reused_tiles += 1
        if not self._probs:  # --max-tiles 0: no model output to reuse
            return np.zeros(image.shape[:2], np.float32)
        p = self._probs[(self.reused_tiles - 1) % len(self._probs)]
        return resize_bilinear(p, image.shape[:2])

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()

    # -- summary -------------------------------------------------------------------------------------------
    def get(self, phase: str, part: str) -> float:
        return self.seconds.get((phase, part), 0.0)

    def n(self, phase: str, part: str) -> int:
        return self.calls.get((phase, part), 0)
