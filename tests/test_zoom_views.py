"""Zoomed views of the references (core.scale.zoom_view, RunParams.zoom_views): the views on arrays,
then the real embedded SAM with the shipped adapters on a real OpenAerialMap reference (Kampala houses) and target
(Zanzibar)."""

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from core.scale import ZOOM_VIEWS, zoom_view

ADAPTERS = Path(__file__).resolve().parent.parent / "resources" / "adapters" / "embedded_virefsam.pt"


def test_zoom_out_mirrors_the_reference_and_its_marks_around_it():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    mask = np.zeros((60, 90), bool)
    mask[10:20, 5:15] = True
    img, m = zoom_view(image, mask, 0.7)
    assert img.shape == (86, 129, 3) and m.shape == (86, 129) and img.flags.c_contiguous
    top, left = (86 - 60) // 2, (129 - 90) // 2
    assert np.array_equal(img[top : top + 60, left : left + 90], image)  # the reference itself in the middle
    assert np.array_equal(m[top : top + 60, left : left + 90], mask)
    assert m.sum() > mask.sum()  # the marked house mirrored into the margin is marked too
    assert np.array_equal(img[top - 1, left : left + 90], image[0])  # symmetric: the edge row repeated


def test_zoom_in_keeps_a_window_on_the_marks_inside_the_image():
    image = np.arange(100 * 100 * 3, dtype=np.uint16).reshape(100, 100, 3)
    mask = np.zeros((100, 100), bool)
    mask[85:95, 88:98] = True  # near the bottom-right corner: the window is shifted to stay inside
    img, m = zoom_view(image, mask, 1.4)
    assert img.shape == (71, 71, 3) and m.shape == (71, 71)
    assert np.array_equal(img, image[29:100, 29:100]) and m.sum() == mask.sum()
    # two marks at opposite corners: a 4x window around their centre of mass keeps neither
    corners = np.zeros((100, 100), bool)
    corners[0, 0] = corners[99, 99] = True
    assert zoom_view(image, corners, 4.0) is None
    assert zoom_view(image, mask, 1.0) is None and zoom_view(image, np.zeros_like(mask), 0.7) is None


@pytest.fixture(scope="module")
def scene(shared_data):
    import rasterio
    from rasterio.windows import Window

    mos = shared_data / "oam_mosaics"

    def read(path, window, bands):
        with rasterio.open(path) as src:
            return src.read(bands, window=Window(*window))

    ref = np.ascontiguousarray(read(mos / "kampala.tif", (768, 768, 512, 512), [1, 2, 3]).transpose(1, 2, 0))
    ref_mask = read(mos / "kampala_buildings.tif", (768, 768, 512, 512), 1) > 0
    tile = np.ascontiguousarray(read(mos / "zanzibar.tif", (1024, 1024, 768, 768), [1, 2, 3]).transpose(1, 2, 0))
    return (ref, ref_mask), tile


def test_views_are_two_more_shots_of_the_trained_mode(engine, scene):
    from core.modeling.predictor import ReferencePredictor
    from core.modeling.virefsam import ViRefSAM

    ref, tile = scene
    model = ViRefSAM.from_adapters(engine.sam, ADAPTERS)
    with_views = ReferencePredictor(engine, mode="virefsam", adapters=model, cache=OrderedDict())  # the default
    without = ReferencePredictor(engine, mode="virefsam", adapters=model, cache=OrderedDict(), zoom_views=False)
    with_views.set_references([ref])
    without.set_references([ref])
    assert without._shots is None  # one reference: one joint decoding, as before
    assert len(with_views._shots) == 1 + len(ZOOM_VIEWS)  # the reference and its two views, each decoded
    assert with_views.reference_state()["shots"] and len(with_views.reference_state()["shots"]) == 3  # Dask
    a, b = with_views.predict(tile), without.predict(tile)
    assert np.isfinite(a).all() and float(np.abs(a - b).max()) > 1e-3  # the views act on the result
    ma, mb = a > 0.5, b > 0.5
    assert mb.mean() > 0.01 and (ma & mb).sum() / max((ma | mb).sum(), 1) > 0.6  # the same houses, mostly
    # the training-free mode matches prototypes without the K-shot ensemble: no views
    free = ReferencePredictor(engine, mode="training_free", cache=OrderedDict())
    free.set_references([ref])
    assert free._shots is None
    # two references bring their own variety: no views (three more decodings per tile each)
    two = ReferencePredictor(engine, mode="virefsam", adapters=model, cache=OrderedDict())
    two.set_references([ref, (ref[0][::-1].copy(), ref[1][::-1].copy())])
    assert len(two._shots) == 2


def test_zoom_views_run_parameter(tmp_path):
    from core.cli import build_parser
    from core.demo import demo_params
    from core.errors import InputError
    from core.params import RunParams

    params = demo_params(tmp_path)
    assert params.zoom_views is True
    old = json.loads(params.to_json())
    del old["zoom_views"]  # a file from before the field: it ran without views
    assert RunParams.from_json(json.dumps(old)).zoom_views is False
    off = dataclasses.replace(params, zoom_views=False)
    assert RunParams.from_json(off.to_json()) == off
    with pytest.raises(InputError, match="Zoomed views"):
        dataclasses.replace(params, zoom_views="yes")
    args = build_parser().parse_args(["segment", "--reference", "r.tif", "--reference-geometry", "g.geojson",
                                      "--target", "t.tif", "--no-zoom-views"])
    assert args.zoom_views is False
    args = build_parser().parse_args(["eval", "--data", "d"])
    assert args.zoom_views is True
    assert build_parser().parse_args(["demo", "--no-zoom-views"]).zoom_views is False
    assert demo_params(tmp_path, zoom_views=False).zoom_views is False
