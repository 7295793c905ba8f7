"""Self-support on the targets (``RunParams.self_support``, :mod:`core.modeling.self_support`): the prototypes on
arrays, then the real embedded SAM with the shipped adapters, a Kampala reference and real Zanzibar tiles (another
city: what self-support is for)."""

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from core.modeling.prototypes import Prototypes
from core.modeling.self_support import BG_CONFIDENT, FG_CONFIDENT, cell_probability, self_support_prototypes

ADAPTERS = Path(__file__).resolve().parent.parent / "resources" / "adapters" / "embedded_virefsam.pt"


def _reference(c=4, n_bg=2):
    fg = torch.zeros(1, c)
    fg[0, 0] = 1.0
    bg = torch.zeros(1, n_bg, c)
    bg[0, :, 1] = 1.0
    return Prototypes(fg, torch.ones(1, dtype=torch.bool), bg, torch.ones(1, n_bg, dtype=torch.bool))


def test_the_target_s_confident_cells_become_prototypes():
    g, c = 8, 4
    plain = torch.zeros(1, c, g, g)
    plain[0, 2] = 1.0  # the target's background looks like channel 2
    plain[0, :, :2, :2] = torch.tensor([0.0, 0.0, 0.0, 1.0])[:, None, None]  # its objects like channel 3
    low = torch.full((1, 1, 4 * g, 4 * g), -8.0)  # sure background everywhere ...
    low[..., :8, :8] = 8.0  # ... but the 2 x 2 cells of the objects: sure foreground
    low[..., 16:24, 16:24] = 0.0  # 2 x 2 cells of p = 0.5: left out of both
    cell = cell_probability(low, g)
    assert cell.shape == (1, g, g) and cell[0, 0, 0] > FG_CONFIDENT and cell[0, 7, 7] < BG_CONFIDENT
    ref = _reference(c, n_bg=2)
    out = self_support_prototypes(plain, low, ref, None, n_bg=3)
    # foreground: the reference's and the target's objects, 1:1
    assert torch.allclose(out.fg[0], torch.tensor([0.5, 0.0, 0.0, 0.5]))
    # background: the reference's two rows first, then up to three of the target's own (its background cells)
    assert out.bg.shape == (1, 5, c) and torch.equal(out.bg[0, :2], ref.bg[0]) and out.bg_valid[0].all()
    assert torch.allclose(out.bg[0, 2:], torch.tensor([0.0, 0.0, 1.0, 0.0]).expand(3, c))
    # nothing confident: the reference's foreground stays, and no background row of the target is valid
    none = self_support_prototypes(plain, torch.zeros_like(low), ref, None, n_bg=3)
    assert torch.equal(none.fg, ref.fg) and not none.bg_valid[0, 2:].any() and none.bg_valid[0, :2].all()
    # padding cells (valid False) are never the target's background
    valid = torch.zeros(1, g, g, dtype=torch.bool)
    valid[0, :4, :4] = True
    part = self_support_prototypes(plain, low, ref, valid, n_bg=3)
    assert part.bg_valid[0, 2:].any() and torch.allclose(part.fg, out.fg)
    # cells like a negative example (``exclude``) are none of the target's own objects: here all of them
    objects = torch.zeros(1, g, g, dtype=torch.bool)
    objects[0, :2, :2] = True
    assert torch.equal(self_support_prototypes(plain, low, ref, None, n_bg=3, exclude=objects).fg, ref.fg)


def test_negative_cells_are_those_more_like_a_negative_than_the_class():
    """:func:`negative_cells`: a cell more similar to a valid negative row than to the foreground; an invalid
    negative row counts for nothing, padding cells are never negative."""
    from core.modeling.prototypes import negative_cells, with_negatives

    g, c = 4, 4
    plain = torch.zeros(1, c, g, g)
    plain[0, 0] = 1.0  # every cell like the class ...
    plain[0, :, 0, 0] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # ... but one, like the negative example
    ref = _reference(c, n_bg=2)
    neg = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    protos = with_negatives(ref, neg, torch.tensor([True, True]))
    cells = negative_cells(plain, protos, 2)
    assert cells.shape == (1, g, g) and int(cells.sum()) == 1 and bool(cells[0, 0, 0])
    assert not negative_cells(plain, with_negatives(ref, neg, torch.tensor([False, True])), 2).any()
    valid = torch.ones(1, g, g, dtype=torch.bool)
    valid[0, 0, 0] = False
    assert not negative_cells(plain, protos, 2, valid).any()
    assert not negative_cells(plain, protos, 0).any()


@pytest.fixture(scope="module")
def ort_engine(embedded_sam):
    from core.modeling.engine import SamEngine

    return SamEngine(embedded_sam, device="cpu", precision="fp32", encoder_backend="auto")


def test_self_support_decodes_the_targets_not_the_reference(ort_engine, kampala_episode):
    from core.modeling.predictor import ReferencePredictor

    (ref, ref_mask), tiles = kampala_episode
    cache = OrderedDict()  # both predictors share the tiles' plain passes
    preds = {on: ReferencePredictor(ort_engine, mode="virefsam", adapters=ADAPTERS, cache=cache,
                                    exclude_found=True, self_support=on) for on in (False, True)}
    for p in preds.values():
        p.set_references([(ref, ref_mask)])
    # set_references' own segmentations of the crop (exclude_found) are the same with and without it
    assert preds[True].found_beyond == pytest.approx(preds[False].found_beyond)
    assert not preds[True]._referencing and preds[True].self_support_applies
    off, on = preds[False].predict(tiles[0]) > 0.5, preds[True].predict(tiles[0]) > 0.5
    assert on.any() and off.any()
    iou = (on & off).sum() / (on | off).sum()
    assert 0.5 < iou < 0.999  # a second decoding of the same tile: changed, not replaced by something else
    # the training-free mode has nothing to decode again
    tf = ReferencePredictor(ort_engine, mode="training_free", cache=cache, self_support=True)
    assert not tf.self_support_applies


def test_several_reference_crops_keep_the_ensemble_s_decoding(ort_engine, kampala_episode):
    """Two reference crops (the Kampala window's halves): the K-shot ensemble's decoding is the result, with or
    without self-support (which would replace it by one decoding from the fused prototypes: on the three NWPU folds
    5-shot 28.4 -> 26.4 mIoU); the reference state a Dask worker receives says so too."""
    import numpy as np

    from core.modeling.predictor import ReferencePredictor

    (ref, ref_mask), tiles = kampala_episode
    halves = [(np.ascontiguousarray(ref[:, s]), np.ascontiguousarray(ref_mask[:, s]))
              for s in (slice(0, 512), slice(512, 1024))]
    assert all(m.any() for _, m in halves)
    cache = OrderedDict()
    preds = {on: ReferencePredictor(ort_engine, mode="virefsam", adapters=ADAPTERS, cache=cache,
                                    exclude_found=True, self_support=on) for on in (False, True)}
    for p in preds.values():
        p.set_references(halves)
    assert preds[True].n_crops == 2 and not preds[True].self_support_applies
    assert np.array_equal(preds[True].predict(tiles[0]), preds[False].predict(tiles[0]))
    worker = ReferencePredictor(ort_engine, mode="virefsam", adapters=ADAPTERS, cache=cache, self_support=True)
    worker.load_reference_state(preds[True].reference_state())
    assert worker.n_crops == 2 and not worker.self_support_applies
    one = ReferencePredictor(ort_engine, mode="virefsam", adapters=ADAPTERS, cache=cache, self_support=True)
    one.set_references([(ref, ref_mask)])
    assert one.n_crops == 1 and one.self_support_applies


def test_self_support_run_parameter(tmp_path, ort_engine, check_run_switch):
    check_run_switch("self_support", "--no-self-support", "Self-support", ort_engine, ADAPTERS, tmp_path)
