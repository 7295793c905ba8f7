"""Processing provider ``virefsam`` with the algorithm ``virefsam:segment_from_reference``.

"Segment rasters from a reference" takes a reference raster, a polygon or line layer that marks the class on
it (selected features only, if the user asks), optional background marks, any number of target rasters, and
writes the polygons found to one feature sink (memory, GeoPackage, Shapefile, ... chosen by Processing), in the
CRS of the first target raster. It runs from the toolbox, the model designer, batch mode and ``qgis_process``;
the engine runs in Processing's worker thread and only sees plain strings (paths, WKT).

The algorithm is assembled from mixins, one file each: :mod:`.processing_parameters` (the parameters' names,
choices and declaration) and :mod:`.processing_run_params` (their values -> RunParams); this file holds its
identity, the run (the engine, the output sink, the class layers) and the provider.
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
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingUtils,
    QgsProcessingProvider,
    QgsWkbTypes,
)
from qgis.PyQt.QtGui import QIcon

from . import adapters as adapter_choice
from .deps import describe_import_error, guard_engine_imports, install_message, missing_dependencies
from .processing_parameters import AlgorithmParameters
from .processing_run_params import RunParamsBuilder

ICON = os.path.join(os.path.dirname(os.path.dirname(__file__)), "resources", "icon.svg")


class SegmentFromReferenceAlgorithm(AlgorithmParameters, RunParamsBuilder, QgsProcessingAlgorithm):
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

    # -- run ----------------------------------------------------------------------------------------------------
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
