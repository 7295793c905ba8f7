"""Processing provider ``virefsam`` with the algorithm ``virefsam:segment_from_reference``.

"Segment rasters from a reference" takes a reference raster, a polygon or line layer that marks the class on
it (selected features only, if the user asks), optional background marks, any number of target rasters, and
writes the polygons found to one feature sink (memory, GeoPackage, Shapefile, ... chosen by Processing), in the
CRS of the first target raster. It runs from the toolbox, the model designer, batch mode and ``qgis_process``;
the engine runs in Processing's worker thread and only sees plain strings (paths, WKT).
"""

from __future__ import annotations

import os
import re

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsFeatureSink,
    QgsGeometry,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingOutputMultipleLayers,
    QgsProcessingOutputNumber,
    QgsProcessingUtils,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingProvider,
    QgsWkbTypes,
)
from qgis.PyQt.QtGui import QIcon

from . import adapters as adapter_choice
from . import run_options
from .deps import describe_import_error, guard_engine_imports, install_message, missing_dependencies
from ..core.params import DEFAULT_TUNE_STEPS
from .references import crs_string, raster_path, web_layer_reason

ICON = os.path.join(os.path.dirname(os.path.dirname(__file__)), "resources", "icon.svg")

MODEL_VALUES = ("embedded", "vit_t", "vit_b", "vit_l", "vit_h")
MODEL_LABELS = (
    "Embedded SAM (default, no download)",
    "MobileSAM checkpoint (vit_t)",
    "SAM ViT-B checkpoint (vit_b)",
    "SAM ViT-L checkpoint (vit_l)",
    "SAM ViT-H checkpoint (vit_h)",
)
MODE_VALUES = ("virefsam", "training_free")
MODE_LABELS = ("ViRefSAM (VCP + DTA adapters)", "Training-free")
ADAPTER_VALUES = tuple(v for _, v in adapter_choice.CHOICES)  # shipped, none, file
ADAPTER_LABELS = ("Shipped (ViRefSAM)", "None (training-free)", "File (ADAPTERS_FILE)")
DEVICE_VALUES = ("auto", "cpu", "cuda")
DEVICE_LABELS = ("Automatic (CUDA if available)", "CPU", "CUDA GPU")
PRECISION_VALUES = tuple(v for _, v in run_options.PRECISIONS)  # fp32, bf16, fp16
PRECISION_LABELS = tuple(label for label, _ in run_options.PRECISIONS)
DECODING_VALUES = tuple(v for _, v in run_options.DECODINGS)  # local, exact
DECODING_LABELS = tuple(label for label, _ in run_options.DECODINGS)
KSHOT_VALUES = tuple(v for _, v in run_options.KSHOTS)  # ensemble, joint
KSHOT_LABELS = tuple(label for label, _ in run_options.KSHOTS)
TUNE_FILES_VALUES = tuple(v for _, v in run_options.TUNE_FILES)  # vcp_alone, all
TUNE_FILES_LABELS = tuple(label for label, _ in run_options.TUNE_FILES)
ADAPTED_PRECISION_VALUES = tuple(v for _, v in run_options.ADAPTED_PRECISIONS)  # int8, fp32
ADAPTED_PRECISION_LABELS = tuple(label for label, _ in run_options.ADAPTED_PRECISIONS)


class SegmentFromReferenceAlgorithm(QgsProcessingAlgorithm):
    REFERENCE_RASTER = "REFERENCE_RASTER"
    REFERENCE_VECTOR = "REFERENCE_VECTOR"
    BACKGROUND_VECTOR = "BACKGROUND_VECTOR"
    TARGETS = "TARGETS"
    CLASS_NAME = "CLASS_NAME"
    MODEL = "MODEL"
    CHECKPOINT = "CHECKPOINT"
    MODE = "MODE"
    ADAPTERS = "ADAPTERS"
    ADAPTERS_FILE = "ADAPTERS_FILE"
    DEVICE = "DEVICE"
    PRECISION = "PRECISION"
    DECODING = "DECODING"
    KSHOT = "KSHOT"
    ADAPTED_PRECISION = "ADAPTED_PRECISION"
    TUNE_STEPS = "TUNE_STEPS"
    TUNE_FILES = "TUNE_FILES"
    ZOOM_VIEWS = "ZOOM_VIEWS"
    EXCLUDE_FOUND = "EXCLUDE_FOUND"
    SELF_SUPPORT = "SELF_SUPPORT"
    CLUSTER = "CLUSTER"
    SCALE = "SCALE"
    TILE_SIZE = "TILE_SIZE"
    OVERLAP = "OVERLAP"
    THRESHOLD = "THRESHOLD"
    MIN_AREA = "MIN_AREA"
    MIN_OBJECT_SHARE = "MIN_OBJECT_SHARE"
    SIMPLIFY = "SIMPLIFY"
    FILL_HOLES = "FILL_HOLES"
    CLASSES = "CLASSES"
    ALLOW_OVERLAP = "ALLOW_OVERLAP"
    NEGATIVES = "NEGATIVES"
    LAYER_PER_CLASS = "LAYER_PER_CLASS"
    CLASS_LAYERS = "CLASS_LAYERS"
    OUTPUT = "OUTPUT"
    N_OBJECTS = "N_OBJECTS"

    # -- identity -----------------------------------------------------------------------------------------------
    def name(self) -> str:
        return "segment_from_reference"

    def displayName(self) -> str:
        return "Segment rasters from a reference"

    def group(self) -> str:
        return ""

    def groupId(self) -> str:
        return ""

    def icon(self) -> QIcon:
        return QIcon(ICON)

    def shortHelpString(self) -> str:
        return (
            "Finds every object of one class in the target rasters from one marked example (or a few).\n\n"
            "Reference raster: the raster on which the example is marked. Reference marks: polygons (outlines) "
            "or lines (scribbles) on one example of the class; use 'Selected features only' to take a few. "
            "Background marks (optional): lines or polygons over things that are not the class.\n"
            "Target rasters: searched tile by tile after resampling to the reference's resolution.\n"
            "Negative examples (optional): vector layers of things that are NOT the class on a target raster, "
            "e.g. wrong polygons of a ViRefSAM result (as 'python -m core segment --negative-geometry'); each "
            "feature's raster is its 'source' attribute (result layers have it), else the target the layer's "
            "geometries overlap most.\n"
            "Model: the embedded SAM needs no download; vit_t/vit_b/vit_l/vit_h need their checkpoint file. "
            "Mode ViRefSAM uses the trained VCP + DTA adapters, Training-free uses SAM alone.\n"
            "Adapters (mode ViRefSAM): Shipped = the adapters that come with the plugin for the model: where two "
            "files are shipped, each segments the reference first and how well it finds the marked objects sets "
            "its weight in the run, a clearly worse one left out (where none are shipped yet, the run is "
            "training-free); None = training-free; File = the .pt file given as "
            "'Adapters file', written by 'python -m core train' for this model (giving a file selects it). The log "
            "says which adapters and mode a run used.\n"
            "Precision (advanced): fp32 everywhere, bf16 on CUDA or CPUs with native bf16, fp16 on CUDA only. "
            "Decoding (advanced, training-free runs): Local (fast) decodes each candidate object on a crop around "
            "it, Exact on the whole tile as SAM does.\n"
            "Several references (advanced, trained mode with several reference crops): Ensemble (default) also "
            "decodes each reference on its own and averages with the joint decoding, Joint decodes them together "
            "only.\n"
            "Adapted pass weights (advanced, trained mode on the CPU): int8 (default) runs the adapted encoder pass "
            "with int8 weights in ONNX Runtime, about 1.6x faster for that pass with the same masks; fp32 as "
            "exported.\n"
            "Tune on the references (advanced, trained mode): steps of VCP tuning on the references before the "
            "targets (0 = off, the default).\n"
            "Other classes (advanced): a classes file, as 'python -m core segment --classes' takes it (a JSON list "
            "of {name, references: [{raster, geometry}], negatives}), segmented in the same run beside the class "
            "above; where classes overlap the more probable one keeps each pixel unless 'Classes may overlap'. "
            "'One layer per class' adds one layer per class (Class layers): temporary layers, or files named "
            "like the output with _<class> added (objects_building.gpkg); the output keeps every class.\n"
            "Output: polygons with class_name, score, area, source raster, reference id and model, in the CRS of "
            "the first target raster.\n\n"
            "Needs the Python packages torch, segment-anything, mobilesam-mirror and timm: open the ViRefSAM dock "
            "(Raster menu > ViRefSAM) and click \"Install dependencies\" (or, by hand: python3 -m pip install torch "
            "torchvision segment-anything mobilesam-mirror timm)."
        )

    def createInstance(self):
        return SegmentFromReferenceAlgorithm()

    # -- parameters ---------------------------------------------------------------------------------------------
    def initAlgorithm(self, config=None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(self.REFERENCE_RASTER, "Reference raster"))
        self.addParameter(
            QgsProcessingParameterFeatureSource(
                self.REFERENCE_VECTOR,
                "Reference marks (polygons or lines on one example of the class; role=background: background)",
                [QgsProcessing.TypeVectorPolygon, QgsProcessing.TypeVectorLine],
            )
        )
        self.addParameter(
            QgsProcessingParameterFeatureSource(
                self.BACKGROUND_VECTOR,
                "Background marks (not the class)",
                [QgsProcessing.TypeVectorPolygon, QgsProcessing.TypeVectorLine],
                optional=True,
            )
        )
        self.addParameter(
            QgsProcessingParameterMultipleLayers(self.TARGETS, "Target rasters", QgsProcessing.TypeRaster)
        )
        negatives = QgsProcessingParameterMultipleLayers(
            self.NEGATIVES, "Negative examples (not the class, on a target raster)",
            QgsProcessing.TypeVectorAnyGeometry, optional=True,
        )
        negatives.setHelp("Layers of things that are NOT the class, e.g. the wrong polygons of a ViRefSAM result: "
                          "the run uses them as negative examples on the raster they lie on (a feature's 'source' "
                          "attribute, else the target raster the layer overlaps most).")
        self.addParameter(negatives)
        self.addParameter(QgsProcessingParameterString(self.CLASS_NAME, "Class name", defaultValue="building"))
        self.addParameter(QgsProcessingParameterEnum(self.MODEL, "Model", options=list(MODEL_LABELS), defaultValue=0))
        self.addParameter(
            QgsProcessingParameterFile(
                self.CHECKPOINT,
                "SAM checkpoint (for vit_t / vit_b / vit_l / vit_h)",
                behavior=QgsProcessingParameterFile.File,
                fileFilter="PyTorch checkpoint (*.pth *.pt)",
                optional=True,
            )
        )
        self.addParameter(QgsProcessingParameterEnum(self.MODE, "Mode", options=list(MODE_LABELS), defaultValue=0))
        adapters = QgsProcessingParameterEnum(
            self.ADAPTERS, "Adapters", options=list(ADAPTER_LABELS), defaultValue=0, optional=True
        )
        adapters.setHelp(adapter_choice.TOOLTIP)
        self.addParameter(adapters)
        adapters_file = QgsProcessingParameterFile(
            self.ADAPTERS_FILE,
            "Adapters file (for Adapters = File)",
            behavior=QgsProcessingParameterFile.File,
            fileFilter="ViRefSAM adapter weights (*.pt)",
            optional=True,
        )
        adapters_file.setHelp("A .pt file of VCP + DTA adapters written by 'python -m core train' for the chosen "
                              "model. Giving a file selects it unless Adapters is None.")
        self.addParameter(adapters_file)
        precision = QgsProcessingParameterEnum(
            self.PRECISION, "Precision", options=list(PRECISION_LABELS), defaultValue=0
        )
        precision.setHelp(run_options.PRECISION_HELP)
        decoding = QgsProcessingParameterEnum(
            self.DECODING, "Decoding (training-free mode)", options=list(DECODING_LABELS), defaultValue=0
        )
        decoding.setHelp(run_options.DECODING_HELP)
        kshot = QgsProcessingParameterEnum(
            self.KSHOT, "Several references (trained mode)", options=list(KSHOT_LABELS), defaultValue=0
        )
        kshot.setHelp(run_options.KSHOT_HELP)
        adapted_precision = QgsProcessingParameterEnum(
            self.ADAPTED_PRECISION, "Adapted pass weights (trained mode, CPU)",
            options=list(ADAPTED_PRECISION_LABELS), defaultValue=0,
        )
        adapted_precision.setHelp(run_options.ADAPTED_PRECISION_HELP)
        tune_steps = QgsProcessingParameterNumber(
            self.TUNE_STEPS, "Tune on the references (steps, trained mode)", QgsProcessingParameterNumber.Integer,
            DEFAULT_TUNE_STEPS, minValue=0, maxValue=500,
        )
        tune_steps.setHelp(run_options.TUNE_TOOLTIP)
        tune_files = QgsProcessingParameterEnum(
            self.TUNE_FILES, "Files to tune (trained mode)", options=list(TUNE_FILES_LABELS), defaultValue=0
        )
        tune_files.setHelp(run_options.TUNE_FILES_TOOLTIP)
        zoom_views = QgsProcessingParameterBoolean(self.ZOOM_VIEWS, "Zoomed views of the references (trained mode)",
                                                   defaultValue=True)
        zoom_views.setHelp(run_options.ZOOM_VIEWS_TOOLTIP)
        exclude_found = QgsProcessingParameterBoolean(
            self.EXCLUDE_FOUND, "Unmarked objects found in the references are not background (trained mode)",
            defaultValue=True)
        exclude_found.setHelp(run_options.EXCLUDE_FOUND_TOOLTIP)
        self_support = QgsProcessingParameterBoolean(
            self.SELF_SUPPORT, "Decode each target again with its own confident objects (trained mode)",
            defaultValue=True)
        self_support.setHelp(run_options.SELF_SUPPORT_TOOLTIP)
        cluster = QgsProcessingParameterString(self.CLUSTER, "Dask scheduler", defaultValue="", optional=True)
        cluster.setHelp("Empty: the tiles are segmented here. An address (tcp://HOST:8786): on the workers of that "
                        "Dask scheduler (dask scheduler; dask worker tcp://HOST:8786 in the plugin's environment), "
                        "which read the rasters themselves (the paths must reach them); the result is the same.")
        scale = QgsProcessingParameterString(self.SCALE, "Working scale", defaultValue="auto", optional=True)
        scale.setHelp("auto (default): the resolution is chosen from the size of the marked objects, and marks far "
                      "apart become several reference crops at it. A number: the zoom of the reference raster's "
                      "own resolution (1 = as it is, 0.5 = half, 2 = twice); targets are resampled to match.")
        advanced = [
            scale,
            QgsProcessingParameterEnum(self.DEVICE, "Device", options=list(DEVICE_LABELS), defaultValue=0),
            precision,
            decoding,
            kshot,
            adapted_precision,
            tune_steps,
            tune_files,
            zoom_views,
            exclude_found,
            self_support,
            QgsProcessingParameterNumber(
                self.TILE_SIZE, "Tile size (pixels)", QgsProcessingParameterNumber.Integer, 1024, minValue=64
            ),
            QgsProcessingParameterNumber(
                self.OVERLAP, "Tile overlap (pixels)", QgsProcessingParameterNumber.Integer, 128, minValue=0
            ),
            QgsProcessingParameterNumber(
                self.THRESHOLD, "Probability threshold", QgsProcessingParameterNumber.Double, 0.5,
                minValue=0.01, maxValue=0.99,
            ),
            QgsProcessingParameterNumber(
                self.MIN_AREA, "Minimum area (pixels²)", QgsProcessingParameterNumber.Double, 16.0, minValue=0
            ),
            QgsProcessingParameterNumber(
                self.MIN_OBJECT_SHARE, "Smallest polygon kept, as a share of the smallest marked object's area",
                QgsProcessingParameterNumber.Double, 0.05, minValue=0, maxValue=0.99,
            ),
            QgsProcessingParameterNumber(
                self.SIMPLIFY, "Simplification tolerance (pixels)", QgsProcessingParameterNumber.Double, 1.0,
                minValue=0,
            ),
            QgsProcessingParameterBoolean(self.FILL_HOLES, "Fill holes", defaultValue=True),
            cluster,
            QgsProcessingParameterFile(self.CLASSES, "Other classes (a classes file, JSON)",
                                       behavior=QgsProcessingParameterFile.File, extension="json", optional=True),
            QgsProcessingParameterBoolean(self.ALLOW_OVERLAP, "Classes may overlap", defaultValue=False),
            QgsProcessingParameterBoolean(self.LAYER_PER_CLASS, "One layer per class", defaultValue=False),
        ]
        for p in advanced:
            p.setFlags(p.flags() | p.FlagAdvanced)
            self.addParameter(p)
        self.addParameter(
            QgsProcessingParameterFeatureSink(self.OUTPUT, "Objects found", QgsProcessing.TypeVectorPolygon)
        )
        self.addOutput(QgsProcessingOutputNumber(self.N_OBJECTS, "Number of objects found"))
        self.addOutput(QgsProcessingOutputMultipleLayers(self.CLASS_LAYERS, "Class layers (One layer per class)"))

    # -- run ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _marks(source):
        """(foreground WKTs, background WKTs) of a source. As in ``python -m core segment``, a feature whose
        attribute ``role`` is ``background`` marks background; every other polygon or line marks the class."""
        if source is None:
            return (), ()
        role = source.fields().lookupField("role")
        fg, bg = [], []
        for f in source.getFeatures():
            g = f.geometry()
            if g.isNull() or g.isEmpty() or g.type() not in (QgsWkbTypes.PolygonGeometry, QgsWkbTypes.LineGeometry):
                continue
            is_bg = role >= 0 and str(f.attribute(role) or "").strip().lower() == "background"
            (bg if is_bg else fg).append(g.asWkt())
        return tuple(fg), tuple(bg)

    def _negatives(self, parameters, context, targets):
        """Negative references (background marks only) from the NEGATIVES layers: grouped by each feature's
        ``source`` raster (a result layer's attribute) when it is a file, else on the target they overlap most."""
        from ..core.segment_cli import negative_reference

        out = []
        for layer in self.parameterAsLayerList(parameters, self.NEGATIVES, context):
            if layer is None or layer.type() != layer.VectorLayer:
                continue
            src = layer.fields().lookupField("source")
            by_raster = {}
            for f in layer.getFeatures():
                g = f.geometry()
                if g.isNull() or g.isEmpty():
                    continue
                raster = str(f.attribute(src) or "") if src >= 0 else ""
                by_raster.setdefault(raster if raster and os.path.isfile(raster) else None, []).append(g.asWkt())
            crs = crs_string(layer.crs())
            if not by_raster:
                by_raster[None] = []  # refused below with one sentence
            for raster, wkts in by_raster.items():
                out.append(negative_reference(
                    wkts, crs, targets, len(out) + 1, f"'{layer.name()}'", raster,
                    fix="add their raster to the target rasters, or give the features a 'source' attribute with "
                        "the raster's path."))
        return tuple(out)

    def build_params(self, parameters, context):
        """The engine's RunParams from the algorithm's parameters (all copied to plain values)."""
        from ..core.errors import VirefsamError
        from ..core.params import ClassSpec, ModelParams, ReferenceSpec, RunParams

        ref_layer = self.parameterAsRasterLayer(parameters, self.REFERENCE_RASTER, context)
        if ref_layer is None:
            raise QgsProcessingException("The reference raster could not be opened.")
        ref_path = raster_path(ref_layer)
        if ref_path is None:
            raise QgsProcessingException(web_layer_reason(ref_layer))
        fg_source = self.parameterAsSource(parameters, self.REFERENCE_VECTOR, context)
        if fg_source is None:
            raise QgsProcessingException("The reference marks layer could not be opened.")
        foreground, background = self._marks(fg_source)
        if not foreground:
            raise QgsProcessingException(
                "The reference marks layer has no polygon or line (or none is selected): mark one example first."
            )
        bg_source = self.parameterAsSource(parameters, self.BACKGROUND_VECTOR, context)
        more_fg, more_bg = self._marks(bg_source)
        extra = more_fg + more_bg  # everything in the background layer marks background
        if bg_source is not None and extra and bg_source.sourceCrs() != fg_source.sourceCrs():
            # one ReferenceSpec has one CRS: bring the background marks into the foreground's CRS
            ct = QgsCoordinateTransform(bg_source.sourceCrs(), fg_source.sourceCrs(), context.transformContext())
            moved = []
            for wkt in extra:
                g = QgsGeometry.fromWkt(wkt)
                g.transform(ct)
                moved.append(g.asWkt())
            extra = tuple(moved)
        background = background + extra

        targets = []
        for layer in self.parameterAsLayerList(parameters, self.TARGETS, context):
            path = raster_path(layer)
            if path is None:
                raise QgsProcessingException(web_layer_reason(layer) or f"{layer.name()} is not a raster file.")
            targets.append(path)
        model_name = MODEL_VALUES[self.parameterAsEnum(parameters, self.MODEL, context)]
        checkpoint = self.parameterAsFile(parameters, self.CHECKPOINT, context) or None
        if model_name != "embedded" and not checkpoint:
            raise QgsProcessingException(f"Choose the checkpoint file of {model_name}, or use the embedded model.")
        mode = MODE_VALUES[self.parameterAsEnum(parameters, self.MODE, context)]
        choice = ADAPTER_VALUES[self.parameterAsEnum(parameters, self.ADAPTERS, context)]
        adapters_file = (self.parameterAsFile(parameters, self.ADAPTERS_FILE, context) or "").strip()
        if mode == "training_free":
            choice = adapter_choice.NONE
        elif adapters_file and choice == adapter_choice.SHIPPED:
            choice = adapter_choice.FILE  # a file given is the file to use
        try:
            mode, adapters = adapter_choice.mode_and_adapters(choice, adapters_file)
        except VirefsamError as exc:
            raise QgsProcessingException(str(exc)) from None
        class_name = self.parameterAsString(parameters, self.CLASS_NAME, context).strip() or "object"
        references = (ReferenceSpec(raster=ref_path, foreground=foreground, background=background,
                                    crs=crs_string(fg_source.sourceCrs()), ref_id="ref1"),)
        classes = ()
        classes_file = (self.parameterAsFile(parameters, self.CLASSES, context) or "").strip()
        try:
            references = references + self._negatives(parameters, context, targets)
            if classes_file:  # other classes in the same run, beside the one above
                from ..core.segment_cli import read_classes

                classes = (ClassSpec(class_name, references),) + read_classes(classes_file, targets)
                class_name, references = "+".join(c.name for c in classes), ()
            return RunParams(
                class_name=class_name,
                references=references,
                classes=classes,
                allow_overlap=self.parameterAsBool(parameters, self.ALLOW_OVERLAP, context),
                layer_per_class=self.parameterAsBool(parameters, self.LAYER_PER_CLASS, context),
                targets=tuple(dict.fromkeys(targets)),
                model=ModelParams(
                    name=model_name,
                    checkpoint=checkpoint if model_name != "embedded" else None,
                    adapters=adapters,
                    device=DEVICE_VALUES[self.parameterAsEnum(parameters, self.DEVICE, context)],
                    precision=PRECISION_VALUES[self.parameterAsEnum(parameters, self.PRECISION, context)],
                    adapted_precision=ADAPTED_PRECISION_VALUES[
                        self.parameterAsEnum(parameters, self.ADAPTED_PRECISION, context)],
                ),
                mode=mode,
                decoding=DECODING_VALUES[self.parameterAsEnum(parameters, self.DECODING, context)],
                kshot=KSHOT_VALUES[self.parameterAsEnum(parameters, self.KSHOT, context)],
                tune_steps=self.parameterAsInt(parameters, self.TUNE_STEPS, context),
                tune_files=TUNE_FILES_VALUES[self.parameterAsEnum(parameters, self.TUNE_FILES, context)],
                zoom_views=self.parameterAsBool(parameters, self.ZOOM_VIEWS, context),
                exclude_found=self.parameterAsBool(parameters, self.EXCLUDE_FOUND, context),
                self_support=self.parameterAsBool(parameters, self.SELF_SUPPORT, context),
                tile_size=self.parameterAsInt(parameters, self.TILE_SIZE, context),
                overlap=self.parameterAsInt(parameters, self.OVERLAP, context),
                threshold=self.parameterAsDouble(parameters, self.THRESHOLD, context),
                min_area=self.parameterAsDouble(parameters, self.MIN_AREA, context),
                min_object_share=self.parameterAsDouble(parameters, self.MIN_OBJECT_SHARE, context),
                simplify=self.parameterAsDouble(parameters, self.SIMPLIFY, context),
                fill_holes=self.parameterAsBool(parameters, self.FILL_HOLES, context),
                cluster=(self.parameterAsString(parameters, self.CLUSTER, context) or "").strip(),
                scale=(self.parameterAsString(parameters, self.SCALE, context) or "").strip() or "auto",
            )
        except VirefsamError as exc:
            raise QgsProcessingException(str(exc)) from None

    def processAlgorithm(self, parameters, context, feedback):
        missing = missing_dependencies()
        if missing:
            raise QgsProcessingException(install_message(missing, processing=True))
        params = self.build_params(parameters, context)
        first_target_crs = self.parameterAsLayerList(parameters, self.TARGETS, context)[0].crs()

        try:
            guard_engine_imports()
            from ..core import pipeline
            from ..core.errors import CancelledError, VirefsamError
        except ImportError as exc:
            raise QgsProcessingException(describe_import_error(exc)) from None

        def progress(fraction, message=""):
            feedback.setProgress(max(0.0, min(100.0, 100.0 * float(fraction))))
            if message:
                feedback.setProgressText(message)

        feedback.pushInfo(adapter_choice.describe_run(params))
        try:
            result = pipeline.run(params, progress=progress, is_cancelled=feedback.isCanceled)
        except CancelledError as exc:
            raise QgsProcessingException(str(exc)) from None
        except VirefsamError as exc:
            raise QgsProcessingException(str(exc)) from None
        except ImportError as exc:
            raise QgsProcessingException(describe_import_error(exc)) from None

        from .result_layers import result_fields

        processed = [t for t in result.targets if t.skipped is None]
        crs = first_target_crs
        if processed and processed[0].crs_wkt:
            crs = QgsCoordinateReferenceSystem.fromWkt(processed[0].crs_wkt)
        fields = result_fields()
        sink, dest_id = self.parameterAsSink(parameters, self.OUTPUT, context, fields, QgsWkbTypes.MultiPolygon, crs)
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, self.OUTPUT))
        for target in result.targets:
            if target.skipped:
                feedback.pushInfo(f"{os.path.basename(target.raster)} skipped: {target.skipped}")
        n = self._write(sink, result.targets, crs, fields, context, feedback)
        class_layers = []
        if params.layer_per_class:  # one more layer per class, beside the output that keeps every class
            from ..core.writers import split_by_class

            dest = self.parameterAsOutputLayer(parameters, self.OUTPUT, context) or ""
            for c in params.class_specs():
                where = "memory:" if dest.startswith("memory:") or not dest else \
                    "{0}_{2}{1}".format(*os.path.splitext(dest), re.sub(r"[^0-9A-Za-z_]+", "_", c.name))
                class_sink, class_id = QgsProcessingUtils.createFeatureSink(where, context, fields,
                                                                            QgsWkbTypes.MultiPolygon, crs)
                self._write(class_sink, [t for _, t in split_by_class(result.targets, [c.name])], crs, fields,
                            context, feedback)
                del class_sink  # closes the file
                made = context.getMapLayer(class_id)
                if made is not None:  # a temporary layer: named after its class
                    made.setName(c.name)
                context.addLayerToLoadOnCompletion(class_id, QgsProcessingContext.LayerDetails(
                    c.name, context.project(), self.CLASS_LAYERS))
                class_layers.append(class_id)
        feedback.pushInfo(result.summary())
        for note in result.notes:
            feedback.pushInfo(note)
        return {self.OUTPUT: dest_id, self.N_OBJECTS: n, self.CLASS_LAYERS: class_layers}

    @staticmethod
    def _write(sink, targets, crs, fields, context, feedback) -> int:
        """The polygons of the processed ``targets`` into ``sink`` (in ``crs``); returns how many."""
        from ..core.results import FIELDS

        names = [n for n, _ in FIELDS]
        n = 0
        for target in targets:
            if target.skipped:
                continue
            tcrs = QgsCoordinateReferenceSystem.fromWkt(target.crs_wkt) if target.crs_wkt else crs
            ct = None
            if tcrs.isValid() and crs.isValid() and tcrs != crs:
                ct = QgsCoordinateTransform(tcrs, crs, context.transformContext())
            for feat in target.features:
                if feedback.isCanceled():
                    break
                g = QgsGeometry.fromWkt(feat.geometry.wkt)
                if g.isNull() or g.isEmpty():
                    continue
                if ct is not None:
                    g.transform(ct)
                g.convertToMultiType()
                f = QgsFeature(fields)
                f.setGeometry(g)
                f.setAttributes([feat.attributes.get(name) for name in names])
                sink.addFeature(f, QgsFeatureSink.FastInsert)
                n += 1
        return n


class ViRefSamProvider(QgsProcessingProvider):
    def id(self) -> str:
        return "virefsam"

    def name(self) -> str:
        return "ViRefSAM"

    def longName(self) -> str:
        return "ViRefSAM: reference-guided segmentation with SAM"

    def icon(self) -> QIcon:
        return QIcon(ICON)

    def loadAlgorithms(self) -> None:
        self.addAlgorithm(SegmentFromReferenceAlgorithm())
