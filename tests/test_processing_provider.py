"""The Processing algorithm "Segment rasters from a reference": registry, parameters, processing.run with the
real engine, refusals as QgsProcessingException sentences, and qgis_process."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("qgis.core")

from qgis.core import (  # noqa: E402
    QgsApplication,
    QgsFeature,
    QgsGeometry,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsVectorLayer,
)

ALG = "virefsam:segment_from_reference"
REF_TILE = "area2_OAM-1238452-1046530-21"
TARGET_TILES = ("area2_OAM-1238449-1046529-21", "area2_OAM-1238454-1046535-21")


@pytest.fixture(scope="module")
def provider(qgis_processing, virefsam_pkg):
    from virefsam.ui.processing_provider import ViRefSamProvider

    registry = QgsApplication.processingRegistry()
    if registry.providerById("virefsam") is not None:
        registry.removeProvider(registry.providerById("virefsam"))
    p = ViRefSamProvider()
    assert registry.addProvider(p)
    yield p
    registry.removeProvider(p)


@pytest.fixture
def paths(shared_data):
    base = shared_data / "oam_buildings"
    return {
        "ref": str(base / "images" / f"{REF_TILE}.tif"),
        "labels": str(base / "labels_geojson" / f"{REF_TILE}.geojson"),
        "targets": [str(base / "images" / f"{t}.tif") for t in TARGET_TILES],
    }


def base_params(paths, out):
    return {
        "REFERENCE_RASTER": paths["ref"],
        "REFERENCE_VECTOR": paths["labels"],
        "TARGETS": paths["targets"],
        "CLASS_NAME": "building",
        "MODEL": 0,
        "MODE": 1,  # training-free
        "DEVICE": 1,  # cpu
        "TILE_SIZE": 256,
        "OVERLAP": 32,
        "OUTPUT": out,
    }


def test_algorithm_is_registered_with_its_parameters(provider):
    alg = QgsApplication.processingRegistry().algorithmById(ALG)
    assert alg is not None and alg.displayName() == "Segment rasters from a reference"
    names = [p.name() for p in alg.parameterDefinitions()]
    for n in ("REFERENCE_RASTER", "REFERENCE_VECTOR", "BACKGROUND_VECTOR", "TARGETS", "CLASS_NAME", "MODEL",
              "CHECKPOINT", "MODE", "DEVICE", "PRECISION", "DECODING", "KSHOT", "ADAPTED_PRECISION", "TUNE_STEPS", "TILE_SIZE", "OVERLAP", "THRESHOLD",
              "MIN_AREA", "SIMPLIFY", "NEGATIVES", "LAYER_PER_CLASS", "OUTPUT"):
        assert n in names
    assert '"Install dependencies"' in alg.shortHelpString() and "pip install" in alg.shortHelpString()
    assert [o.name() for o in alg.outputDefinitions()] == ["OUTPUT", "N_OBJECTS", "CLASS_LAYERS"]


def test_parameters_become_plain_run_params(provider, paths, qgis_project):
    """Reference marks with a `role` attribute: background features go to ReferenceSpec.background."""
    labels = QgsVectorLayer(paths["labels"], "labels", "ogr")
    marks = QgsVectorLayer("Polygon?crs=EPSG:4326&field=role:string", "marks", "memory")
    feats = []
    for i, f in enumerate(labels.getFeatures()):
        nf = QgsFeature(marks.fields())
        nf.setGeometry(QgsGeometry(f.geometry()))
        nf["role"] = "background" if i == 0 else "object"
        feats.append(nf)
    marks.dataProvider().addFeatures(feats)
    qgis_project.addMapLayer(marks)
    alg = QgsApplication.processingRegistry().createAlgorithmById(ALG)
    context = QgsProcessingContext()
    context.setProject(qgis_project)
    params = base_params(paths, "TEMPORARY_OUTPUT")
    params["REFERENCE_VECTOR"] = marks.id()
    run = alg.build_params(params, context)
    ref = run.references[0]
    assert len(ref.background) == 1 and len(ref.foreground) == len(feats) - 1
    assert ref.crs == "EPSG:4326" and ref.raster == paths["ref"]
    assert run.targets == tuple(paths["targets"]) and run.mode == "training_free"
    assert run.model.device == "cpu" and run.model.adapters is None and run.tile_size == 256
    assert run.decoding == "local" and run.model.precision == "fp32" and run.kshot == "ensemble"  # the defaults
    params["KSHOT"] = 1
    assert alg.build_params(params, context).kshot == "joint"


# -- precision and decoding -----------------------------------------------------------------------------------------
def test_precision_and_decoding_are_advanced_parameters_with_their_help(provider):
    alg = QgsApplication.processingRegistry().algorithmById(ALG)
    precision = alg.parameterDefinition("PRECISION")
    assert precision.options()[0].startswith("fp32") and precision.options()[1].startswith("bf16")
    assert precision.options()[2].startswith("fp16") and len(precision.options()) == 3
    decoding = alg.parameterDefinition("DECODING")
    assert decoding.options() == ["Local (fast)", "Exact (SAM on the whole tile)"]
    for p in (precision, decoding):
        assert p.defaultValue() == 0 and p.flags() & p.FlagAdvanced
    for words in ("fp32", "bf16", "AVX512-BF16", "fp16", "CUDA"):
        assert words in precision.help()
    for words in ("Training-free", "crop", "whole tile"):
        assert words in decoding.help()
    assert "Precision" in alg.shortHelpString() and "Decoding" in alg.shortHelpString()
    kshot = alg.parameterDefinition("KSHOT")
    assert kshot.options() == ["Ensemble (default)", "Joint"] and kshot.defaultValue() == 0
    assert kshot.flags() & kshot.FlagAdvanced and "Trained mode" in kshot.help()
    assert "Several references" in alg.shortHelpString()
    adapted = alg.parameterDefinition("ADAPTED_PRECISION")
    assert adapted.options()[0].startswith("int8") and adapted.defaultValue() == 0
    assert adapted.flags() & adapted.FlagAdvanced and "ONNX Runtime" in adapted.help()


@pytest.mark.parametrize(
    "given,precision,decoding",
    [
        ({"PRECISION": 1, "DECODING": 1}, "bf16", "exact"),
        ({"PRECISION": 2}, "fp16", "local"),
        ({"DECODING": 0, "PRECISION": 0}, "fp32", "local"),
    ],
)
def test_precision_and_decoding_become_run_params(provider, paths, qgis_project, given, precision, decoding):
    alg = QgsApplication.processingRegistry().createAlgorithmById(ALG)
    context = QgsProcessingContext()
    context.setProject(qgis_project)
    params = base_params(paths, "TEMPORARY_OUTPUT")
    params.update(given)
    run = alg.build_params(params, context)
    assert (run.model.precision, run.decoding) == (precision, decoding)
    assert run.model.device == "cpu" and run.mode == "training_free"
    assert run.model.adapted_precision == "int8"  # the default
    params["ADAPTED_PRECISION"] = 1
    assert alg.build_params(params, context).model.adapted_precision == "fp32"
    from core.params import DEFAULT_TUNE_STEPS

    assert run.tune_steps == DEFAULT_TUNE_STEPS and run.tune_files == "vcp_alone"
    params["TUNE_STEPS"], params["TUNE_FILES"] = 16, 1
    assert (alg.build_params(params, context).tune_steps, alg.build_params(params, context).tune_files) == (16, "all")
    assert run.zoom_views is True  # zoomed views of a one-crop reference: on by default
    params["ZOOM_VIEWS"] = False
    assert alg.build_params(params, context).zoom_views is False
    assert run.exclude_found is True  # found unmarked objects of the references: not background, by default
    params["EXCLUDE_FOUND"] = False
    assert alg.build_params(params, context).exclude_found is False
    assert run.min_object_share == 0.05  # specks under 5% of the smallest marked object go
    params["MIN_OBJECT_SHARE"] = 0.0
    assert alg.build_params(params, context).min_object_share == 0.0
    assert run.self_support is True  # the targets decoded again with their own objects: on by default
    params["SELF_SUPPORT"] = False
    assert alg.build_params(params, context).self_support is False


def test_a_precision_the_device_cannot_run_is_one_sentence(provider, paths, qgis_processing):
    """fp16 on the CPU: the engine's sentence (core.device), as a QgsProcessingException, before any model."""
    import processing

    params = base_params(paths, "TEMPORARY_OUTPUT")
    params["PRECISION"] = 2  # fp16, with DEVICE cpu
    steps = []

    class Feedback(QgsProcessingFeedback):
        def setProgressText(self, text):
            steps.append(text)
            super().setProgressText(text)

    with pytest.raises(QgsProcessingException) as info:
        processing.run(ALG, params, feedback=Feedback())
    assert str(info.value) == "fp16 runs on CUDA GPUs only: choose fp32 (or bf16 on a CPU that supports it)."
    assert "loading the model" not in steps  # refused before the engine started


def test_refusals_are_processing_exceptions_with_one_sentence(provider, paths, qgis_project, qgis_processing):
    import processing

    params = base_params(paths, "TEMPORARY_OUTPUT")
    params["MODEL"] = 2  # vit_b without its checkpoint
    with pytest.raises(QgsProcessingException, match="checkpoint"):
        processing.run(ALG, params)
    params = base_params(paths, "TEMPORARY_OUTPUT")
    params["TILE_SIZE"], params["OVERLAP"] = 128, 100
    with pytest.raises(QgsProcessingException, match="overlap"):
        processing.run(ALG, params)


def test_processing_run_with_the_real_engine(provider, paths, qgis_processing, tmp_path):
    import processing

    from virefsam.core.results import FIELDS

    out = str(tmp_path / "buildings.gpkg")
    feedback = QgsProcessingFeedback()
    progress = []
    feedback.progressChanged.connect(progress.append)
    result = processing.run(ALG, base_params(paths, out), feedback=feedback)
    assert result["OUTPUT"].startswith(out)
    layer = QgsVectorLayer(result["OUTPUT"], "out", "ogr")
    assert layer.isValid() and layer.crs().authid() == "EPSG:4326"
    assert [f.name() for f in layer.fields() if f.name() != "fid"] == [n for n, _ in FIELDS]
    assert layer.featureCount() == result["N_OBJECTS"] > 0
    sources = {Path(f["source"]).stem for f in layer.getFeatures()}
    assert sources <= set(TARGET_TILES)
    for f in layer.getFeatures():
        assert f["class_name"] == "building" and f.geometry().isGeosValid()
    assert progress and max(progress) >= 99


def test_qgis_process_runs_the_algorithm(plugin_parent, paths, tmp_path):
    """The command-line runner of QGIS finds the provider (metadata hasProcessingProvider=yes) and runs it."""
    exe = shutil.which("qgis_process.bin") or shutil.which("qgis_process")
    if exe is None:
        pytest.skip("qgis_process is not installed")
    home = tmp_path / "home"
    ini = home / ".local/share/QGIS/QGIS3/profiles/default/QGIS/QGIS3.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text("[PythonPlugins]\nvirefsam=true\n")
    site = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
    env = dict(os.environ, HOME=str(home), QT_QPA_PLATFORM="offscreen", QGIS_PLUGINPATH=str(plugin_parent),
               PYTHONPATH=str(site), XDG_RUNTIME_DIR=str(tmp_path / "run"))
    (tmp_path / "run").mkdir(mode=0o700)
    listing = subprocess.run([exe, "plugins"], capture_output=True, text=True, env=env, timeout=300)
    assert "* virefsam" in listing.stdout, listing.stdout + listing.stderr
    out = tmp_path / "qp.gpkg"
    cmd = [exe, "run", ALG, "--",
           f"REFERENCE_RASTER={paths['ref']}", f"REFERENCE_VECTOR={paths['labels']}",
           f"TARGETS={paths['targets'][0]}", "CLASS_NAME=building", "MODE=1", "DEVICE=1",
           "TILE_SIZE=256", "OVERLAP=32", f"OUTPUT={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "N_OBJECTS" in proc.stdout
    layer = QgsVectorLayer(str(out), "qp", "ogr")
    assert layer.isValid() and layer.featureCount() > 0


def test_algorithm_in_a_processing_model(provider, paths, qgis_processing, tmp_path):
    """The algorithm as a step of a model (what the model designer builds), run through processing.run."""
    import processing
    from qgis.core import (
        QgsProcessingModelAlgorithm,
        QgsProcessingModelChildAlgorithm,
        QgsProcessingModelChildParameterSource,
        QgsProcessingModelOutput,
    )

    model = QgsProcessingModelAlgorithm("buildings from a reference", "tests")
    child = QgsProcessingModelChildAlgorithm(ALG)
    child.setChildId("segment")
    params = base_params(paths, None)
    params["TARGETS"] = paths["targets"][:1]
    for name, value in params.items():
        if name == "OUTPUT":
            continue
        child.addParameterSources(name, [QgsProcessingModelChildParameterSource.fromStaticValue(value)])
    out = QgsProcessingModelOutput("objects", "objects")
    out.setChildOutputName("OUTPUT")
    child.setModelOutputs({"objects": out})
    model.addChildAlgorithm(child)
    assert model.childAlgorithm("segment").algorithm() is not None
    dest = str(tmp_path / "model_out.gpkg")
    result = processing.run(model, {"segment:objects": dest})
    layer = QgsVectorLayer(result["segment:objects"], "m", "ogr")
    assert layer.isValid() and layer.featureCount() > 0


# -- adapters ------------------------------------------------------------------------------------------------------
TRAINED = Path(__file__).resolve().parent.parent / "resources" / "adapters" / "embedded_virefsam.pt"


def test_adapters_parameters_with_their_help(provider):
    alg = QgsApplication.processingRegistry().algorithmById(ALG)
    adapters = alg.parameterDefinition("ADAPTERS")
    assert adapters.options() == ["Shipped (ViRefSAM)", "None (training-free)", "File (ADAPTERS_FILE)"]
    assert adapters.defaultValue() == 0 and adapters.flags() & adapters.FlagOptional
    for words in ("Shipped (ViRefSAM)", "resources/adapters", "None (training-free)", "python -m core train"):
        assert words in adapters.help()
    adapters_file = alg.parameterDefinition("ADAPTERS_FILE")
    assert adapters_file.flags() & adapters_file.FlagOptional and "python -m core train" in adapters_file.help()
    assert "Adapters" in alg.shortHelpString()


@pytest.mark.parametrize(
    "given,mode,adapters",
    [
        ({}, "virefsam", "auto"),  # the algorithm's defaults: mode ViRefSAM, shipped adapters (the check chooses)
        ({"ADAPTERS": 1}, "training_free", None),
        ({"ADAPTERS": 2, "ADAPTERS_FILE": str(TRAINED)}, "virefsam", str(TRAINED)),
        ({"ADAPTERS_FILE": str(TRAINED)}, "virefsam", str(TRAINED)),  # a file given selects it
        ({"ADAPTERS": 1, "ADAPTERS_FILE": str(TRAINED)}, "training_free", None),
        ({"MODE": 1, "ADAPTERS": 2, "ADAPTERS_FILE": str(TRAINED)}, "training_free", None),
    ],
)
def test_adapters_parameters_become_run_params(provider, paths, qgis_project, given, mode, adapters):
    from qgis.core import QgsProcessingContext

    alg = QgsApplication.processingRegistry().createAlgorithmById(ALG)
    context = QgsProcessingContext()
    context.setProject(qgis_project)
    params = base_params(paths, "TEMPORARY_OUTPUT")
    del params["MODE"]
    params.update(given)
    run = alg.build_params(params, context)
    assert (run.mode, run.model.adapters) == (mode, adapters)


def test_missing_adapters_file_is_one_sentence(provider, paths, qgis_processing, tmp_path):
    import processing

    from virefsam.ui.adapters import NO_FILE_CHOSEN, missing_file_sentence

    params = base_params(paths, "TEMPORARY_OUTPUT")
    params.update(MODE=0, ADAPTERS=2, ADAPTERS_FILE=str(tmp_path / "gone.pt"))
    with pytest.raises(QgsProcessingException) as info:
        processing.run(ALG, params)
    assert str(info.value) == missing_file_sentence(str(tmp_path / "gone.pt"))
    params.update(ADAPTERS_FILE="")
    with pytest.raises(QgsProcessingException) as info:
        processing.run(ALG, params)
    assert str(info.value) == NO_FILE_CHOSEN


def test_processing_run_with_an_adapters_file_logs_which_adapters(provider, paths, qgis_processing, tmp_path):
    """The real engine with the adapters file: ViRefSAM mode (the features say embedded+adapters), and the log
    says which file and mode."""
    import processing

    params = base_params(paths, str(tmp_path / "with_adapters.gpkg"))
    params.update(MODE=0, ADAPTERS=2, ADAPTERS_FILE=str(TRAINED), TARGETS=paths["targets"][:1])
    feedback = QgsProcessingFeedback()
    result = processing.run(ALG, params, feedback=feedback)
    assert f"Mode: ViRefSAM, adapters {TRAINED}." in feedback.textLog()
    layer = QgsVectorLayer(result["OUTPUT"], "out", "ogr")
    assert layer.isValid()
    assert {f["model"] for f in layer.getFeatures()} <= {"embedded+adapters"}


# -- Dask scheduler (issue #17) ---------------------------------------------------------------------------------
def test_dask_scheduler_is_an_advanced_parameter_that_becomes_run_params(provider, paths, qgis_project):
    alg = QgsApplication.processingRegistry().createAlgorithmById(ALG)
    cluster = alg.parameterDefinition("CLUSTER")
    assert cluster.description() == "Dask scheduler" and cluster.flags() & cluster.FlagAdvanced
    assert "dask worker" in cluster.help()
    context = QgsProcessingContext()
    context.setProject(qgis_project)
    params = base_params(paths, "TEMPORARY_OUTPUT")
    assert alg.build_params(params, context).cluster == ""  # the default: here
    params["CLUSTER"] = " tcp://10.0.0.5:8786 "
    assert alg.build_params(params, context).cluster == "tcp://10.0.0.5:8786"
    params["CLUSTER"] = "dask:4"
    with pytest.raises(QgsProcessingException, match="Unknown cluster 'dask:4'"):
        alg.build_params(params, context)


def test_a_classes_file_adds_classes_to_the_run(provider, paths, qgis_project, tmp_path):
    """Other classes (advanced CLASSES, the CLI's classes file) run beside the algorithm's own class."""
    import json

    from virefsam.core.demo import DEMO

    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps([{"name": "house", "references": [
        {"raster": str(DEMO / "reference.tif"), "geometry": str(DEMO / "reference_houses.geojson")}]}]))
    alg = QgsApplication.processingRegistry().createAlgorithmById(ALG)
    context = QgsProcessingContext()
    context.setProject(qgis_project)
    params = base_params(paths, "TEMPORARY_OUTPUT")
    params.update(CLASSES=str(classes), ALLOW_OVERLAP=True)
    run = alg.build_params(params, context)
    assert [c.name for c in run.class_specs()] == ["building", "house"] and run.allow_overlap
    assert run.class_name == "building+house" and run.references == ()
    assert run.classes[1].references[0].raster == str(DEMO / "reference.tif")
    classes.write_text(json.dumps([{"name": "building", "references": [
        {"raster": str(DEMO / "reference.tif"), "geometry": str(DEMO / "reference_houses.geojson")}]}]))
    with pytest.raises(QgsProcessingException, match="Two classes are named 'building'"):
        alg.build_params(params, context)


def _boxes_layer(name, extent, crs, n=2, source=None):
    """A memory polygon layer of ``n`` small squares inside ``extent`` (a 'source' attribute when given)."""
    fields = "&field=source:string" if source is not None else ""
    layer = QgsVectorLayer(f"Polygon?crs={crs.authid()}{fields}", name, "memory")
    w, h = extent.width(), extent.height()
    feats = []
    for k in range(n):
        x0, y0 = extent.xMinimum() + w * (0.1 + 0.4 * k), extent.yMinimum() + h * 0.3
        f = QgsFeature(layer.fields())
        f.setGeometry(QgsGeometry.fromWkt(
            f"POLYGON(({x0} {y0}, {x0 + w * 0.2} {y0}, {x0 + w * 0.2} {y0 + h * 0.2}, {x0} {y0 + h * 0.2}, {x0} {y0}))"))
        if source is not None:
            f.setAttributes([source])
        feats.append(f)
    layer.dataProvider().addFeatures(feats)
    return layer


def test_negative_examples_become_negative_references_and_the_run_uses_them(provider, paths, qgis_project,
                                                                             qgis_processing, tmp_path):
    """NEGATIVES (the CLI's --negative-geometry): layers of things that are not the class on a target raster;
    the raster is the features' 'source' (a result layer's attribute) or the target the layer overlaps most."""
    import processing
    from qgis.core import QgsRasterLayer

    second = QgsRasterLayer(paths["targets"][1], "second")
    on_second = _boxes_layer("wrong", second.extent(), second.crs())  # no source: found by overlap
    with_source = _boxes_layer("picked", second.extent(), second.crs(), n=1, source=paths["targets"][0])
    empty = QgsVectorLayer("Polygon?crs=EPSG:4326", "empty", "memory")
    qgis_project.addMapLayers([on_second, with_source, empty])
    alg = QgsApplication.processingRegistry().createAlgorithmById(ALG)
    context = QgsProcessingContext()
    context.setProject(qgis_project)
    params = base_params(paths, "TEMPORARY_OUTPUT")
    params["NEGATIVES"] = [on_second.id(), with_source.id()]
    run = alg.build_params(params, context)
    negs = [r for r in run.references if not r.foreground]
    assert [(r.ref_id, r.raster, len(r.background)) for r in negs] == [
        ("neg1", paths["targets"][1], 2), ("neg2", paths["targets"][0], 1)]
    assert RunParamsJSON(run) == run  # the parameters file replays them

    params["NEGATIVES"] = [empty.id()]
    with pytest.raises(QgsProcessingException, match="^'empty' holds no geometry to use as negative examples.$"):
        alg.build_params(params, context)
    far = _boxes_layer("far", second.extent(), second.crs())
    far.dataProvider().truncate()
    f = QgsFeature(far.fields())
    f.setGeometry(QgsGeometry.fromWkt("POLYGON((0 0, 1 0, 1 1, 0 1, 0 0))"))
    far.dataProvider().addFeatures([f])
    qgis_project.addMapLayer(far)
    params["NEGATIVES"] = [far.id()]
    with pytest.raises(QgsProcessingException, match="lie on none of the target rasters; add their raster to the"):
        alg.build_params(params, context)

    out = str(tmp_path / "with_negatives.gpkg")
    feedback = _Notes()
    params = base_params(paths, out)
    params["NEGATIVES"] = [on_second.id()]
    result = processing.run(ALG, params, context=context, feedback=feedback)
    assert result["N_OBJECTS"] >= 0
    assert any("2 negative examples (marked 'not building') used" in t for t in feedback.infos), feedback.infos


def RunParamsJSON(run):
    from virefsam.core.params import RunParams

    return RunParams.from_json(run.to_json())


class _Notes(QgsProcessingFeedback):
    def __init__(self):
        super().__init__()
        self.infos = []

    def pushInfo(self, info):
        self.infos.append(info)
        super().pushInfo(info)


def test_one_layer_per_class_through_processing(provider, paths, qgis_project, qgis_processing, tmp_path):
    """LAYER_PER_CLASS: the output keeps every class; CLASS_LAYERS adds one layer per class, written beside a file
    output as OUTPUT_<class>.gpkg (temporary layers for a temporary output), each with its class only."""
    import json

    import processing

    from virefsam.core.demo import DEMO

    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps([{"name": "house", "references": [
        {"raster": str(DEMO / "reference.tif"), "geometry": str(DEMO / "reference_houses.geojson")}]}]))
    alg = QgsApplication.processingRegistry().createAlgorithmById(ALG)
    assert alg.parameterDefinition("LAYER_PER_CLASS").defaultValue() is False
    context = QgsProcessingContext()
    context.setProject(qgis_project)
    params = base_params(paths, str(tmp_path / "objects.gpkg"))
    params.update(CLASSES=str(classes))
    assert not alg.build_params(params, context).layer_per_class  # the default: one output layer
    params["LAYER_PER_CLASS"] = True
    assert alg.build_params(params, context).layer_per_class

    result = processing.run(ALG, params, context=context, feedback=QgsProcessingFeedback())
    everything = QgsVectorLayer(result["OUTPUT"], "all", "ogr")
    total = {}
    for f in everything.getFeatures():
        total[f["class_name"]] = total.get(f["class_name"], 0) + 1
    assert total.get("building", 0) > 0, total
    assert [Path(p.split("|")[0]).name for p in result["CLASS_LAYERS"]] == ["objects_building.gpkg",
                                                                            "objects_house.gpkg"]
    for cls, uri in zip(("building", "house"), result["CLASS_LAYERS"]):
        layer = QgsVectorLayer(uri, cls, "ogr")
        assert layer.isValid() and layer.featureCount() == total.get(cls, 0)
        assert {f["class_name"] for f in layer.getFeatures()} <= {cls}

    params["OUTPUT"] = "TEMPORARY_OUTPUT"
    result = processing.run(ALG, params, context=context, feedback=QgsProcessingFeedback())
    layers = [i if isinstance(i, QgsVectorLayer) else context.getMapLayer(i) for i in result["CLASS_LAYERS"]]
    assert [lay.name() for lay in layers] == ["building", "house"]
    assert [lay.featureCount() for lay in layers] == [total.get("building", 0), total.get("house", 0)]
