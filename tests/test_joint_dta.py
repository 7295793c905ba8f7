"""Several classes, one adapted (DTA) encoder pass per tile (core.modeling.joint_dta).

Real embedded SAM, the real shipped adapters, real rasters: the demo's Kampala cut-out with its houses and a patch
of bare ground as a second class (pipeline), OpenAerialMap mosaics (the ONNX Runtime runner on a joint table).
"""

import dataclasses
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from core.demo import DEMO
from core.modeling import joint_dta, ort_adapted
from core.modeling.dta import DTAContext
from core.modeling.predictor import ReferencePredictor
from core.modeling.prototypes import Prototypes, pseudo_mask
from core.params import ClassSpec, ModelParams, ReferenceSpec, RunParams
from core.segment_cli import read_geometries

ADAPTERS = Path(__file__).resolve().parent.parent / "resources" / "adapters" / "embedded_virefsam.pt"
TARGET = str(DEMO / "target_kampala.tif")
GROUND = "POLYGON ((4368380 -673950, 4368390 -673950, 4368390 -673960, 4368380 -673960, 4368380 -673950))"


@pytest.fixture(scope="module")
def houses():
    fg, _, crs = read_geometries(str(DEMO / "reference_houses.geojson"))
    return ReferenceSpec(str(DEMO / "reference.tif"), fg, crs=crs, ref_id="houses")


def _params(classes, **kw):
    # the adapted passes of the tiles are counted: exclude_found's segmentation of each reference crop (one more
    # adapted pass per class, before the tiles) is off here; so is self-support, whose second decoding follows
    # the first's confident cells and so magnifies the small differences of the joint context (the last test)
    kw.setdefault("exclude_found", False)
    kw.setdefault("self_support", False)
    return RunParams("+".join(c.name for c in classes), () if len(classes) > 1 else classes[0].references,
                     (TARGET,), model=ModelParams(device="cpu", adapters="default"), mode="virefsam",  # DTA's pass
                     classes=tuple(classes) if len(classes) > 1 else (), **kw)


class _Counter:
    """Counts the adapted passes of the real ONNX Runtime runner (and the table sizes it was fed)."""

    def __init__(self, monkeypatch):
        self.rows = []
        real = ort_adapted.OrtAdaptedEncoder.__call__
        counter = self

        def call(runner, x, ctx, stem=None):
            counter.rows.append(int(ctx.table.shape[1]))
            return real(runner, x, ctx, stem=stem)

        monkeypatch.setattr(ort_adapted.OrtAdaptedEncoder, "__call__", call)


def _features(result):
    return sorted((f.attributes["class_name"], round(f.geometry.area, 6), f.geometry.wkt) for f in
                  result.targets[0].features)


def test_two_class_trained_run_shares_the_adapted_pass(houses, monkeypatch):
    from core.pipeline import run
    from core.scale import ZOOM_VIEWS
    from shapely.ops import unary_union

    ground = (ReferenceSpec(str(DEMO / "reference.tif"), (GROUND,), crs="EPSG:3857", ref_id="ground"),)
    classes = (ClassSpec("building", (houses,)), ClassSpec("ground", ground))
    counter = _Counter(monkeypatch)
    shared = run(_params(classes))
    n_shared, rows_shared = len(counter.rows), list(counter.rows)
    counter.rows.clear()
    apart = run(_params(classes, shared_adapted_pass=False))
    assert n_shared >= 1 and len(counter.rows) == 2 * n_shared  # one adapted pass per tile instead of two
    # both tables; each class's one reference crop and its two zoomed views (RunParams.zoom_views): 1 + 3 x 5 rows
    rows = 1 + (1 + len(ZOOM_VIEWS)) * 5
    assert all(r == 2 * rows for r in rows_shared) and all(r == rows for r in counter.rows)
    for result in (shared, apart):
        assert "+adapters" in result.targets[0].features[0].attributes["model"]
    a = Counter(f.attributes["class_name"] for f in shared.targets[0].features)
    b = Counter(f.attributes["class_name"] for f in apart.targets[0].features)
    assert a["building"] > 5 and a["ground"] > 0, a
    for cls in ("building", "ground"):  # the shared pass segments each class as its own pass does
        ga = unary_union([f.geometry for f in shared.targets[0].features if f.attributes["class_name"] == cls])
        gb = unary_union([f.geometry for f in apart.targets[0].features if f.attributes["class_name"] == cls])
        iou = ga.intersection(gb).area / max(ga.union(gb).area, 1e-9)
        assert iou > 0.9, (cls, iou)
    saved = RunParams.from_json(_params(classes, shared_adapted_pass=False).to_json())
    assert saved.shared_adapted_pass is False and RunParams.from_json(_params(classes).to_json()).shared_adapted_pass
    # parameters files from before the field load with the shared pass
    assert RunParams.from_dict({k: v for k, v in _params(classes).to_dict().items()
                                if k != "shared_adapted_pass"}).shared_adapted_pass


def test_two_class_shared_pass_with_self_support(houses):
    """Self-support (on by default) decodes each class again after the shared pass, as its own pass does."""
    from core.pipeline import run
    from shapely.ops import unary_union

    ground = (ReferenceSpec(str(DEMO / "reference.tif"), (GROUND,), crs="EPSG:3857", ref_id="ground"),)
    classes = (ClassSpec("building", (houses,)), ClassSpec("ground", ground))
    shared = run(_params(classes, self_support=True))
    apart = run(_params(classes, self_support=True, shared_adapted_pass=False))
    off = run(_params(classes, shared_adapted_pass=False))
    geoms = [unary_union([f.geometry for f in r.targets[0].features if f.attributes["class_name"] == "building"])
             for r in (shared, apart, off)]

    def iou(a, b):
        return a.intersection(b).area / max(a.union(b).area, 1e-9)

    assert iou(geoms[0], geoms[1]) > 0.9  # 0.95 when written
    assert iou(geoms[1], geoms[2]) < 0.999  # the second decoding changed the polygons


def test_one_class_run_is_unchanged(houses, monkeypatch):
    """One class never takes the joint path: the same polygons with the field on or off, and the same as the
    predictor's own pass (one adapted pass per tile either way)."""
    from core.pipeline import run

    counter = _Counter(monkeypatch)
    cls = (ClassSpec("building", (houses,)),)
    on = run(_params(cls))
    n_on = len(counter.rows)
    off = run(_params(cls, shared_adapted_pass=False))
    assert _features(on) == _features(off) and len(_features(on)) > 5
    from core.scale import ZOOM_VIEWS

    rows = 1 + (1 + len(ZOOM_VIEWS)) * 5  # the reference crop and its two zoomed views, 5 bg rows each
    assert n_on >= 1 and len(counter.rows) == 2 * n_on and set(counter.rows) == {rows}


def _read(path, window, bands):
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(path) as src:
        return np.ascontiguousarray(src.read(bands, window=Window(*window)))


def test_ort_runner_takes_a_multi_class_table(shared_data):
    """The joint context of two classes (12 table rows) through the exported ONNX Runtime graph equals the
    PyTorch adapted encoder on the same context; with one class the joint context is the class's own."""
    from core.engines import load_engine

    mos = shared_data / "oam_mosaics"
    ref = _read(mos / "kampala.tif", (512, 512, 1024, 1024), [1, 2, 3]).transpose(1, 2, 0).copy()
    houses = _read(mos / "kampala_buildings.tif", (512, 512, 1024, 1024), 1) > 0
    tile = _read(mos / "zanzibar.tif", (1024, 1024, 1024, 1024), [1, 2, 3]).transpose(1, 2, 0).copy()
    eng = load_engine(ModelParams(device="cpu"))
    cache = OrderedDict()
    # the joint table of two one-crop classes without their zoomed views: 2 x (1 + 5) rows
    preds = [ReferencePredictor(eng, mode="virefsam", adapters=ADAPTERS, cache=cache, zoom_views=False)
             for _ in range(2)]
    assert preds[0].model is preds[1].model and isinstance(preds[0].model.adapted_runner, ort_adapted.OrtAdaptedEncoder)
    preds[0].set_references([(ref, houses)])
    preds[1].set_references([(ref, ~houses)])  # everything but the houses: another class on the same scene
    assert joint_dta.shared_pass_applies(preds) and not joint_dta.shared_pass_applies(preds[:1])
    model = preds[0].model
    with torch.inference_mode():
        t = preds[0]._encode([tile])[0]
        pe = model.sam.prompt_encoder.get_dense_pe()
        refined, tables = [], []
        for p in preds:
            table = model.vcp.refine(p._protos.table(), t.plain, pe, t.valid)
            refined.append(Prototypes(table[:, 0], p._protos.fg_valid, table[:, 1:], p._protos.bg_valid))
            tables.append(table)
        one, _ = joint_dta.joint_context(t.plain, refined[:1], tables[:1], t.valid)
        assert torch.equal(one.assign, pseudo_mask(t.plain, refined[0], t.valid)[2])
        ctx, per_class = joint_dta.joint_context(t.plain, refined, tables, t.valid)
        assert ctx.table.shape == (1, 12, 256)
        used = set(ctx.assign.unique().tolist())
        assert {0, 6} <= used and max(used) <= 12  # both classes' foreground rows are used
        assert torch.equal(ctx.assign == 0, per_class[0][0] & ~(per_class[1][0] & (per_class[1][1] > per_class[0][1])))
        fast = model.adapted_runner(t.x, ctx, stem=t.stem)  # the default: the int8 graph
        exact = ort_adapted.OrtAdaptedEncoder(model.encoder, threads=1, precision="fp32")(t.x, ctx, stem=t.stem)
        want = model.encoder(t.x, DTAContext(ctx.table, ctx.assign))
        probs = joint_dta.predict_classes(preds, tile)
    assert float((exact - want).abs().max()) < 1e-4  # the fp32 graph: measured ~1e-6
    assert float((fast - want).norm() / want.norm()) < 0.05  # int8 weights: measured ~0.01
    assert probs.shape == (2, 1024, 1024)
    for p, prob in zip(preds, probs):  # each class as its own adapted pass segments it
        a, b = prob > 0.5, p.predict(tile) > 0.5
        assert a.mean() > 0.01 and (a & b).sum() / (a | b).sum() > 0.9
    # the same joint pass in PyTorch (no ONNX Runtime runner: CUDA, bf16/fp16, encoder_backend 'torch')
    slow = load_engine(ModelParams(device="cpu", encoder_backend="torch"))
    cache = OrderedDict()
    torch_preds = [ReferencePredictor(slow, mode="virefsam", adapters=ADAPTERS, cache=cache, zoom_views=False)
                   for _ in range(2)]
    assert torch_preds[0].model.adapted_runner is None
    torch_preds[0].set_references([(ref, houses)])
    torch_preds[1].set_references([(ref, ~houses)])
    for a, b in zip(joint_dta.predict_classes(torch_preds, tile), probs):
        a, b = a > 0.5, b > 0.5
        # > 0.99 with the fp32 graph; the default int8 graph: 0.980 measured on this tile (boundary pixels flip),
        # 0.973 on a CI CPU (test_ort_adapted holds the int8 graph to its own bounds)
        assert (a & b).sum() / (a | b).sum() > 0.965


def test_k_shot_ensemble_classes_share_the_adapted_pass(shared_data):
    """Two classes with K = 2 references each (the K-shot ensemble, the default): the shared pass decodes every
    shot on the one adapted embedding as each class's own pass does. A class given twice (the joint context is
    then each class's own): the same probabilities; houses and everything else: the houses as their own pass
    (IoU >= 0.99, measured 0.998), the other class as in the one-shot test (> 0.9, measured 0.95)."""
    from core.engines import load_engine

    mos = shared_data / "oam_mosaics"
    shots = []
    for x, y in ((512, 512), (1024, 0)):
        image = _read(mos / "kampala.tif", (x, y, 512, 512), [1, 2, 3]).transpose(1, 2, 0).copy()
        shots.append((image, _read(mos / "kampala_buildings.tif", (x, y, 512, 512), 1) > 0))
    tile = _read(mos / "zanzibar.tif", (1024, 1024, 1024, 1024), [1, 2, 3]).transpose(1, 2, 0).copy()
    eng = load_engine(ModelParams(device="cpu"))

    def predictors(refs, kshot="ensemble"):
        cache = OrderedDict()
        preds = [ReferencePredictor(eng, mode="virefsam", adapters=ADAPTERS, cache=cache, kshot=kshot) for _ in refs]
        for p, r in zip(preds, refs):
            p.set_references(r)
        return preds

    def iou(a, b):
        a, b = a > 0.5, b > 0.5
        return (a & b).sum() / max((a | b).sum(), 1)

    twice = predictors([shots, shots])
    assert all(len(p._shots) == 2 for p in twice) and joint_dta.shared_pass_applies(twice)
    for prob, p in zip(joint_dta.predict_classes(twice, tile), twice):
        own = p.predict(tile)
        assert float(np.abs(prob - own).max()) <= 1e-5 and (own > 0.5).mean() > 0.01
    two = predictors([shots, [(image, ~m) for image, m in shots]])
    probs = joint_dta.predict_classes(two, tile)
    ious = [iou(prob, p.predict(tile)) for prob, p in zip(probs, two)]
    assert ious[0] >= 0.99 and ious[1] > 0.9, ious
    joint = joint_dta.predict_classes(predictors([shots, [(image, ~m) for image, m in shots]], "joint"), tile)
    assert float(np.abs(joint - probs).max()) > 1e-3  # the shots were decoded, not only the joint prototypes


def test_bench_two_class_default_row_runs_one_adapted_pass_per_tile(tmp_path):
    """The bench row of #19's 1.3x goal: two trained classes cost one plain and one adapted pass per tile, as one."""
    import argparse

    from core import bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path)])
    target = bench.mosaic_vrt(TARGET, 512, str(tmp_path / "t.vrt"))
    one = bench.run_e2e(args, [target], str(tmp_path / "one.gpkg"), variant="default", log=lambda *a: None)
    two = bench.run_e2e(args, [target], str(tmp_path / "two.gpkg"), variant="twoclass_default", log=lambda *a: None)
    assert two["tiles"] == one["tiles"] >= 1
    for row in (one, two):
        assert row["encoder_calls"]["tiles"] == row["encoder_calls"]["adapted"] == row["tiles"], row["encoder_calls"]
    from core.scale import ZOOM_VIEWS

    # the reference crop and its zoomed views, encoded once for both classes
    assert two["encoder_calls"]["reference"] == 1 + len(ZOOM_VIEWS)


# -- accuracy guard (slow, opt-in: pytest -m slow tests/test_joint_dta.py -s prints the table) -----------------
DUBAI = {"building": 1, "road": 3, "vegetation": 4, "water": 5}


def _dubai_episodes(shared_data, pair, per_scene=2):
    """Per Dubai scene (tile1..8): the first part with both classes on >= 2 % of its pixels is the reference, the
    next ``per_scene`` such parts the targets. Yields (reference (image, label map), [(image, label map)])."""
    from PIL import Image

    root = shared_data / "dubai_landcover"
    for scene in range(1, 9):
        parts = []
        for i in range(1, 10):
            img = root / "images" / f"tile{scene}_image_part_{i:03d}.jpg"
            if img.is_file():
                lab = np.asarray(Image.open(root / "masks" / f"tile{scene}_image_part_{i:03d}.png"))
                if all((lab == DUBAI[c]).mean() >= 0.02 for c in pair):
                    parts.append((np.asarray(Image.open(img).convert("RGB")), lab))
        if len(parts) >= 2:
            yield parts[0], parts[1 : 1 + per_scene]


def _guard(eng, episodes, truths):
    """Mean IoU against the truth (probability > 0.5) per class: one adapted pass per class, then the shared one."""
    sep, joint = [[] for _ in truths], [[] for _ in truths]
    for (ref, ref_lab), targets in episodes:
        cache = OrderedDict()
        preds = [ReferencePredictor(eng, mode="virefsam", adapters=ADAPTERS, cache=cache) for _ in truths]
        for p, truth in zip(preds, truths):
            p.set_references([(ref, truth(ref_lab))])
        for image, lab in targets:
            shared = joint_dta.predict_classes(preds, image)
            for k, (p, truth) in enumerate(zip(preds, truths)):
                gt = truth(lab)
                for out, prob in ((sep, p.predict(image)), (joint, shared[k])):
                    m = prob > 0.5
                    out[k].append(float((m & gt).sum() / max((m | gt).sum(), 1)))
    return [float(np.mean(s)) for s in sep], [float(np.mean(j)) for j in joint], len(sep[0])


@pytest.mark.slow
@pytest.mark.parametrize("pair", [("building", "water"), ("road", "vegetation"), ("building", "everything else")])
def test_shared_pass_holds_accuracy_on_real_scenes(shared_data, pair):
    """#19's guard: per class, the shared adapted pass loses at most 0.02 IoU on average against one pass per
    class. Dubai land cover (72 labelled tiles of 8 scenes, 2 targets per scene) or, for buildings + everything
    else, the Zanzibar OpenAerialMap mosaic (a 1024 px reference window, 6 target windows)."""
    from core.engines import load_engine

    eng = load_engine(ModelParams(device="cpu", threads=1))
    if pair[1] == "everything else":
        mos = shared_data / "oam_mosaics"

        def window(x, y):
            return (_read(mos / "zanzibar.tif", (x, y, 1024, 1024), [1, 2, 3]).transpose(1, 2, 0).copy(),
                    _read(mos / "zanzibar_buildings.tif", (x, y, 1024, 1024), 1) > 0)

        episodes = [(window(0, 0), [window(x, y) for x, y in ((1024, 1024), (2048, 2560), (3072, 0), (0, 3072),
                                                              (2048, 1024), (3072, 3072))])]
        truths = [lambda m: m, lambda m: ~m]
    else:
        episodes = list(_dubai_episodes(shared_data, pair))
        truths = [lambda lab, c=c: lab == DUBAI[c] for c in pair]
    sep, joint, n = _guard(eng, episodes, truths)
    for c, s, j in zip(pair, sep, joint):
        print(f"{c}: mean IoU {s:.4f} one pass per class, {j:.4f} shared ({j - s:+.4f}, {n} targets)")
        assert j >= s - 0.02, (c, s, j)
