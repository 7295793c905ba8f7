"""Unmarked objects the model finds in the reference crops are left out of the background prototypes
(``RunParams.exclude_found``, ``ReferencePredictor.set_references``): on arrays, then the real embedded SAM with
the shipped adapters on a real OpenAerialMap crop of Zanzibar, its OSM buildings marked a few of many (as an analyst
marks) or every one."""

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from core.modeling.predictor import PARTIAL_MARKS, ReferencePredictor, unmarked_found

ADAPTERS = Path(__file__).resolve().parent.parent / "resources" / "adapters" / "embedded_virefsam.pt"


def test_unmarked_found_keeps_the_objects_no_mark_touches():
    prob = np.zeros((40, 40), np.float32)
    prob[2:8, 2:8] = 0.9  # touches the mark
    prob[20:30, 20:30] = 0.8  # another object
    prob[35:38, 2:5] = 0.3  # below the threshold
    marks = np.zeros((40, 40), bool)
    marks[7:9, 7:9] = True
    out = unmarked_found(prob, marks)
    assert out.sum() == 100 and out[20:30, 20:30].all() and not out[2:8, 2:8].any()
    assert not unmarked_found(prob, np.ones_like(marks)).any()


@pytest.fixture(scope="module")
def ort_engine(embedded_sam):
    from core.modeling.engine import SamEngine

    return SamEngine(embedded_sam, device="cpu", precision="fp32", encoder_backend="auto")


@pytest.fixture(scope="module")
def crop(shared_data):
    """A 1024 x 1024 crop of the Zanzibar orthophoto with its OSM buildings: (image, buildings, partial marks of
    its three largest buildings)."""
    import rasterio
    from rasterio.windows import Window
    from scipy import ndimage

    mos = shared_data / "oam_mosaics"
    win = Window(1024, 1024, 1024, 1024)  # col, row: 27 buildings
    with rasterio.open(mos / "zanzibar.tif") as src:
        image = np.ascontiguousarray(src.read([1, 2, 3], window=win).transpose(1, 2, 0))
    with rasterio.open(mos / "zanzibar_buildings.tif") as src:
        buildings = src.read(1, window=win) > 0
    labels, n = ndimage.label(buildings)
    assert n > 10  # many houses: an analyst marks a few
    sizes = np.bincount(labels.ravel())[1:]
    partial = np.isin(labels, 1 + np.argsort(sizes)[-3:])
    return image, buildings, partial


def _predictor(engine, exclude):
    return ReferencePredictor(engine, mode="virefsam", adapters=ADAPTERS, cache=OrderedDict(), exclude_found=exclude)


def test_partial_marks_leave_the_found_houses_out_of_the_background(ort_engine, crop):
    image, buildings, partial = crop
    keep = _predictor(ort_engine, False)
    keep.set_references([(image, partial)])
    assert keep.found_beyond is None  # not asked: not measured
    found = unmarked_found(keep.predict(image), partial)
    # what the model finds beyond three marked houses is mostly the other (unmarked) houses of the crop
    assert found.sum() > PARTIAL_MARKS * partial.sum()
    assert (found & buildings & ~partial).sum() / found.sum() > 0.6

    excl = _predictor(ort_engine, True)
    excl.set_references([(image, partial)])
    assert excl.found_beyond == pytest.approx(found.sum() / partial.sum(), rel=1e-6)
    a, b = keep._protos, excl._protos
    assert torch.equal(a.fg, b.fg)  # the marked cells pool as before
    assert not torch.allclose(a.bg, b.bg)  # the background prototypes without the unmarked houses
    assert len(excl._shots) == len(keep._shots) == 3  # the zoomed views too, each with its own background
    assert all(not torch.allclose(p.bg, q.bg) for p, q in zip(keep._shots, excl._shots))
    # the tiles see more of the unmarked houses' kind (the crop itself as a target: recall on its houses)
    pa, pb = keep.predict(image) > 0.5, excl.predict(image) > 0.5
    assert (pb & buildings).sum() >= (pa & buildings).sum()
    # a Dask worker gets the cleaned prototypes with the reference state
    state = excl.reference_state()
    assert np.array_equal(state["bg"], b.bg.numpy())


def test_complete_marks_and_the_check_keep_the_background(ort_engine, crop):
    from core import choice

    image, buildings, _ = crop
    excl = _predictor(ort_engine, True)
    excl.set_references([(image, buildings)])  # every house marked: what it finds beyond is no house
    assert excl.found_beyond is not None and excl.found_beyond <= PARTIAL_MARKS
    keep = _predictor(ort_engine, False)
    keep.set_references([(image, buildings)])
    assert torch.equal(keep._protos.bg, excl._protos.bg)
    # the check on the reference runs each file as loaded, then gives the predictor back as it was
    check = choice.check_reference(excl, [(image, buildings)])
    assert check.iou > 0.3 and excl.exclude_found is True and excl.found_beyond is None


def test_exclude_found_run_parameter(tmp_path, ort_engine, check_run_switch):
    check_run_switch("exclude_found", "--no-exclude-found", "background", ort_engine, ADAPTERS, tmp_path)
