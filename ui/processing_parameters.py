"""The parameters of the Processing algorithm ``virefsam:segment_from_reference``: their names, the choices of
its enumerations (values and labels) and their declaration (``initAlgorithm``).

:class:`AlgorithmParameters` is a mixin of :class:`.processing_provider.SegmentFromReferenceAlgorithm`; the
algorithm's other parts read the parameters by these names.
"""

from __future__ import annotations

from qgis.core import (
    QgsProcessing,
    QgsProcessingOutputMultipleLayers,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
)

from . import adapters as adapter_choice
from . import run_options
from ..core.params import DEFAULT_TUNE_STEPS

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


class AlgorithmParameters:
    """The parameters of :class:`.processing_provider.SegmentFromReferenceAlgorithm` (a mixin; see the module
    doc)."""

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
