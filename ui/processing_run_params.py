"""The Processing algorithm's parameter values -> the engine's RunParams (``build_params``).

:class:`RunParamsBuilder` is a mixin of :class:`.processing_provider.SegmentFromReferenceAlgorithm` (it reads the
parameters by the names of :class:`.processing_parameters.AlgorithmParameters`): the reference marks (a feature's
``role`` = background marks background; the background layer's marks brought into the marks' CRS), the target
rasters, the negative examples grouped by raster, the model, mode and adapters, the other classes of a classes
file, all copied to plain values; a refusal is a QgsProcessingException with one sentence.
"""

from __future__ import annotations

import os

from qgis.core import QgsCoordinateTransform, QgsGeometry, QgsProcessingException, QgsWkbTypes

from . import adapters as adapter_choice
from .processing_parameters import (
    ADAPTED_PRECISION_VALUES,
    ADAPTER_VALUES,
    DECODING_VALUES,
    DEVICE_VALUES,
    KSHOT_VALUES,
    MODE_VALUES,
    MODEL_VALUES,
    PRECISION_VALUES,
    TUNE_FILES_VALUES,
)
from .references import crs_string, raster_path, web_layer_reason


class RunParamsBuilder:
    """The RunParams of :class:`.processing_provider.SegmentFromReferenceAlgorithm` (a mixin; see the module doc)."""

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
