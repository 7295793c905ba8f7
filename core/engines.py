"""The model of a run, built once per process, and the run's predictor.

``load_engine(ModelParams)`` builds a :class:`core.modeling.engine.SamEngine` once per (model, checkpoint,
device, precision, threads, backend) and keeps it for later runs in this process (one model in memory at a
time); ``make_predictor`` wraps it in the run's ReferencePredictor; ``resolve_adapters`` turns the one name of
the shipped adapters (``"default"``), ``"none"`` or a path into a file; ``adapter_candidates`` lists the shipped
files ``"auto"`` chooses from by a check on the reference (:mod:`core.choice`, in the pipeline and eval). Used by
the pipeline, the Dask workers (``core.cluster_worker``), eval and bench alike, so that no one of them imports
another.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, List, Optional

from .errors import ModelError
from .params import ModelParams, RunParams
from .paths import RESOURCES

_ENGINES: Dict[tuple, object] = {}
_ENGINES_LOCK = threading.Lock()


def default_adapters(model_name: str) -> Optional[Path]:
    """The trained VCP + DTA weights shipped for ``model_name`` in ``resources/adapters/``, if there are any."""
    path = RESOURCES / "adapters" / f"{model_name}_virefsam.pt"
    return path if path.is_file() else None


def objects_adapters(model_name: str) -> Optional[Path]:
    """The second shipped file (VCP alone, for compact objects) that ``"auto"`` may choose, if there is one."""
    path = RESOURCES / "adapters" / f"{model_name}_virefsam_objects.pt"
    return path if path.is_file() else None


def _listed(model: ModelParams) -> List[str]:
    """``model.adapters`` split at commas (several files: a blend weighed by the check)."""
    return [a.strip() for a in str(model.adapters).split(",") if a.strip()]


def adapter_candidates(model: ModelParams) -> List[Path]:
    """The files a run may use: for ``"auto"`` the shipped ones (default first), for a comma list each file, else
    the one file (or none)."""
    if model.adapters == "auto":
        return [p for p in (default_adapters(model.name), objects_adapters(model.name)) if p is not None]
    if model.adapters and "," in str(model.adapters):
        return [_existing(Path(a)) for a in _listed(model)]
    path = resolve_adapters(model)
    return [] if path is None else [path]


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise ModelError(
            f"The adapter weights file {path} does not exist: choose the .pt file written by training, or no adapters."
        )
    return path


def resolve_adapters(model: ModelParams) -> Optional[Path]:
    """``model.adapters`` as a file path, or None for the training-free mode. ``"auto"`` gives the default file
    and a comma list its first file here: the weights of several files need the references
    (:func:`adapter_candidates`, :mod:`core.choice`)."""
    if model.adapters in (None, "", "none"):
        return None
    if model.adapters in ("default", "auto"):
        return default_adapters(model.name)
    return _existing(Path(_listed(model)[0]))


def check_precision(model: ModelParams) -> None:
    """A precision the device cannot run (fp16 on a CPU, bf16 on a CPU without it) ends in the engine's one
    sentence (ModelError) here, before any model is built."""
    if model.precision != "fp32":
        from .device import resolve_device, resolve_precision

        resolve_precision(model.precision, resolve_device(model.device))


def load_engine(model: ModelParams):
    """The SamEngine for these model parameters, built once per process (thread-safe).

    ``model.encoder_backend`` ``auto`` runs the plain encoder passes in ONNX Runtime for the embedded model on the
    CPU in fp32 when onnxruntime is there (``engine.encoder_backend`` says which backend runs), else in PyTorch.
    """
    key = (model.name, model.checkpoint, model.device, model.precision, model.threads, model.encoder_backend,
           model.adapted_precision)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            check_precision(model)  # refused before SAM is built, not after
            from .modeling.engine import SamEngine
            from .modeling.registry import build_sam

            backend = model.encoder_backend
            if backend == "auto" and model.name != "embedded":  # only the embedded model has the ORT graph
                backend = "torch"
            engine = SamEngine(build_sam(model.name, model.checkpoint), device=model.device,
                               precision=model.precision, threads=model.threads, encoder_backend=backend,
                               adapted_precision=model.adapted_precision)
            _ENGINES.clear()  # keep one model in memory at a time
            _ENGINES[key] = engine
        return engine


def make_predictor(engine, params: RunParams, adapters, cache=None, cache_size: Optional[int] = None):
    """The run's ReferencePredictor (its class looked up at call time, so that the bench can time it); ``cache``:
    one OrderedDict shared by the predictors of a several-class run (each tile's plain pass once); ``cache_size``:
    how many entries of it this predictor keeps (None: the predictor's default)."""
    from .modeling import predictor as predictor_module
    from .modeling.training_free import decoder_context

    kw = {} if cache_size is None else {"cache_size": cache_size}
    return predictor_module.ReferencePredictor(engine, mode=params.mode, adapters=adapters, seed=params.seed, **kw,
                                               decoder_context=decoder_context(params.decoding), cache=cache,
                                               kshot=params.kshot, tune_steps=params.tune_steps,
                                               tune_ignore_found=True,  # an analyst's marks are partial
                                               tune_files=params.tune_files,
                                               zoom_views=params.zoom_views,
                                               exclude_found=params.exclude_found,
                                               self_support=params.self_support)


def run_predictor(engine, params: RunParams, cache=None):
    """The predictor a run's parameters describe: one ReferencePredictor, or, when ``params.model`` names
    several adapters files with their weights (written by the pipeline after the check on the reference), a
    :class:`core.modeling.blend.BlendedPredictor` of those with a weight above 0, sharing one embedding cache.
    Several files without weights: the first alone (the pipeline weighs them before the tiles)."""
    files = adapter_candidates(params.model) if params.mode == "virefsam" else []
    weights = params.model.adapter_weights
    if len(files) > 1 and len(weights) == len(files):
        kept = [(f, w) for f, w in zip(files, weights) if w > 0]
        if len(kept) > 1:
            from collections import OrderedDict

            from .modeling.blend import BlendedPredictor

            cache = OrderedDict() if cache is None else cache
            return BlendedPredictor([make_predictor(engine, params, f, cache=cache) for f, _ in kept],
                                    [w for _, w in kept])
        files = [kept[0][0]] if kept else files
    return make_predictor(engine, params, files[0] if files else None, cache=cache)
