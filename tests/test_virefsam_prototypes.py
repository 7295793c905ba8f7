"""Prototypes (Eq. 1), pseudo-mask (Eq. 3), L_reg and prompt derivation: small synthetic tensors, no SAM."""

import numpy as np
import pytest
import torch

from core.modeling.prototypes import (
    Prototypes,
    background_prototypes,
    build_prototypes,
    mask_to_grid,
    masked_average_pool,
    pseudo_mask,
    valid_grid,
    voronoi_partition,
)
from core.modeling.training_free import component_prompts, mask_prototype_match, static_prompts_from_mask
from core.modeling.vcp import query_regularizer
from core.modeling.virefsam import prompts_from_pseudo_mask


def _square_mask(k=1, h=64, w=64, y=(20, 40), x=(10, 30)):
    m = torch.zeros(k, h, w)
    m[:, y[0] : y[1], x[0] : x[1]] = 1.0
    return m


def test_voronoi_every_background_cell_in_exactly_one_region():
    torch.manual_seed(0)
    feats = torch.randn(2, 8, 64, 64)
    fg = _square_mask(2)
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[1, 50:] = False  # padding rows of the second shot
    protos, ok, region = background_prototypes(feats, fg, valid, n_regions=5, seed=3)
    bg = (fg < 0.5) & valid
    assert ok.tolist() == [True] * 5
    # every background cell of every shot has exactly one region in [0, 5); nothing else has one
    assert bool((region[bg] >= 0).all()) and bool((region[bg] < 5).all())
    assert bool((region[~bg] == -1).all())
    assert set(region[bg].unique().tolist()) == set(range(5))
    # each prototype is the mean of its region's cells (weights 1 - fg = 1 for hard masks)
    cells = feats.permute(0, 2, 3, 1)
    for r in range(5):
        assert torch.allclose(protos[r], cells[region == r].mean(0), atol=1e-5)


def test_voronoi_deterministic_given_seed_and_vectorised_assignment():
    pts = torch.rand(500, 2, generator=torch.Generator().manual_seed(1))
    a, sa = voronoi_partition(pts, 5, seed=7)
    b, sb = voronoi_partition(pts, 5, seed=7)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    c, sc = voronoi_partition(pts, 5, seed=8)
    assert not torch.equal(sa, sc)
    # nearest-seed assignment: each point is at least as close to its own seed as to any other
    d = torch.cdist(pts, pts[sa])
    assert torch.allclose(d.gather(1, a[:, None])[:, 0], d.min(1).values)
    # farthest-point seeds are distinct and spread out
    assert len(set(sa.tolist())) == 5
    assert torch.pdist(pts[sa]).min() > 0.2


def test_tiny_and_empty_background():
    feats = torch.randn(1, 4, 8, 8)
    fg = torch.ones(1, 8, 8)
    fg[0, 0, :2] = 0.0  # two background cells
    protos, ok, region = background_prototypes(feats, fg, None, n_regions=5, seed=0)
    assert ok.tolist() == [True, True, False, False, False]
    assert torch.count_nonzero(protos[2:]) == 0
    assert sorted(region[0, 0, :2].tolist()) == [0, 1]
    # empty background: every prototype invalid, zero, and the pseudo-mask falls back to the mean fg similarity
    p = build_prototypes(feats, torch.ones(1, 8, 8), None, n_bg=5)
    assert not bool(p.bg_valid.any()) and torch.count_nonzero(p.bg) == 0
    assert bool(p.fg_valid.all())
    mask, margin, assign = pseudo_mask(feats, p)
    assert 0 < int(mask.sum()) < 64
    assert set(assign.unique().tolist()) <= {0, 6}  # fg or "no prototype"
    # duplicate positions (K shots, same cells): fewer regions than asked, still a partition
    feats2 = torch.randn(3, 4, 8, 8)
    fg2 = torch.ones(3, 8, 8)
    fg2[:, 3, 3] = 0
    protos2, ok2, region2 = background_prototypes(feats2, fg2, None, n_regions=5)
    assert ok2.tolist() == [True, False, False, False, False]
    assert torch.allclose(protos2[0], feats2[:, :, 3, 3].mean(0), atol=1e-6)


def test_masked_average_pool_and_grid_helpers():
    feats = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    w = torch.zeros(2, 4, 4)
    w[0, 1, 1] = 1.0
    w[1, 2, 2] = 3.0
    pooled, ok = masked_average_pool(feats, w)
    assert ok and torch.allclose(pooled, (feats[0, :, 1, 1] + 3 * feats[1, :, 2, 2]) / 4)
    pooled, ok = masked_average_pool(feats, torch.zeros(2, 4, 4))
    assert not ok and torch.count_nonzero(pooled) == 0
    m = torch.zeros(1, 1024, 1024, dtype=torch.bool)
    m[0, :16, :8] = True
    g = mask_to_grid(m)
    assert g.shape == (1, 64, 64) and g[0, 0, 0] == 0.5 and g.sum() == 0.5
    v = valid_grid((1024, 500))
    assert v.shape == (64, 64) and bool(v[:, :31].all()) and not bool(v[:, 32:].any())


def test_pseudo_mask_separates_synthetic_classes():
    torch.manual_seed(0)
    c = 16
    a, b = torch.randn(c), torch.randn(c)
    feats = b[None, :, None, None].repeat(1, 1, 64, 64) + 0.1 * torch.randn(1, c, 64, 64)
    truth = _square_mask(1)[0].bool()
    feats[0][:, truth] = a[:, None] + 0.1 * torch.randn(c, int(truth.sum()))
    p = build_prototypes(feats, truth[None].float(), None, n_bg=5, seed=0)
    target = feats.flip(-1)  # the object moved
    mask, margin, assign = pseudo_mask(target, p)
    assert torch.equal(mask[0], truth.flip(-1))
    assert bool((assign[0][~mask[0]] >= 1).all()) and bool((assign[0][~mask[0]] <= 5).all())
    valid = torch.ones(1, 64, 64, dtype=torch.bool)
    valid[:, :, 60:] = False
    mask, margin, assign = pseudo_mask(target, p, valid)
    assert not bool(mask[0, :, 60:].any()) and bool((assign[0, :, 60:] == 6).all())


def test_l_reg_zero_for_orthogonal_queries_and_one_for_identical():
    q = torch.linalg.qr(torch.randn(256, 64))[0].t()[None] * 3.0  # 64 orthogonal rows, any scale
    assert float(query_regularizer(q)) < 1e-10
    same = torch.randn(1, 1, 256).repeat(2, 64, 1)
    assert abs(float(query_regularizer(same)) - 1.0) < 1e-5


def test_prompts_from_pseudo_mask_fixed_shapes_and_empty_mask():
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[0, 10:20, 30:40] = True
    margin = torch.randn(2, 64, 64)
    margin[0, 15, 35] = 5.0
    coords, labels, boxes, has_box = prompts_from_pseudo_mask(mask, margin)
    assert coords.shape == (2, 2, 2) and labels.tolist() == [[1, 0], [1, 0]]
    assert has_box.tolist() == [True, False]
    assert boxes[0].tolist() == [30 * 16, 10 * 16, 40 * 16, 20 * 16]
    assert coords[0, 0].tolist() == [35 * 16 + 7.5, 15 * 16 + 7.5]


def test_component_prompts_rank_and_cap():
    mask = np.zeros((64, 64), bool)
    margin = np.zeros((64, 64), np.float32)
    for i in range(10):  # ten separate 2x2 objects, later ones more confident
        mask[2 + 6 * i : 4 + 6 * i, 5:7] = True
        margin[2 + 6 * i : 4 + 6 * i, 5:7] = 0.1 * (i + 1)
    pts, boxes, scores = component_prompts(mask, margin, max_prompts=4)
    assert pts.shape == (4, 2) and boxes.shape == (4, 4)
    assert np.all(np.diff(scores) <= 0)
    assert boxes[0].tolist() == [5 * 16, (2 + 54) * 16, 7 * 16, (4 + 54) * 16]
    pts, boxes, scores = component_prompts(np.zeros((64, 64), bool), margin)
    assert len(pts) == 0


def test_static_prompts_relative_coordinates():
    m = np.zeros((100, 200), bool)
    m[10:30, 20:60] = True
    m[70:75, 150:152] = True
    pts, boxes = static_prompts_from_mask(m)
    assert pts.shape == (2, 2)
    assert boxes[0].tolist() == pytest.approx([0.1, 0.1, 0.3, 0.3])
    assert 0.1 < pts[0, 0] < 0.3 and 0.1 < pts[0, 1] < 0.3


def test_prototypes_expand_and_cat():
    p = Prototypes(torch.randn(1, 8), torch.ones(1, dtype=torch.bool), torch.randn(1, 5, 8),
                   torch.ones(1, 5, dtype=torch.bool))
    e = p.expand(3)
    assert e.fg.shape == (3, 8) and e.bg.shape == (3, 5, 8) and e.table().shape == (3, 6, 8)
    assert Prototypes.cat([p, p]).bg_valid.shape == (2, 5)


def test_mask_prototype_match_with_and_without_background_prototypes():
    torch.manual_seed(0)
    c = 16
    a, b = torch.randn(c), torch.randn(c)
    feats = b[None, :, None, None].repeat(1, 1, 64, 64)
    truth = _square_mask(1)[0].bool()
    feats[0][:, truth] = a[:, None]
    low = torch.full((2, 256, 256), -5.0)
    low[0, 80:160, 40:120] = 5.0  # the object (grid cells 20-40 x 10-30)
    low[1, 200:240, 200:240] = 5.0  # background
    valid = torch.ones(1, 64, 64, dtype=torch.bool)
    p = build_prototypes(feats, truth[None].float(), None, n_bg=5)
    keep, fg_sim, bg_sim = mask_prototype_match(feats, low, p, valid)
    assert keep.tolist() == [True, False]
    # a reference mask over the whole image: no bg prototype, the image's mean fg similarity decides
    p_nobg = build_prototypes(feats, truth[None].float(), None, n_bg=5)
    p_nobg = Prototypes(p_nobg.fg, p_nobg.fg_valid, torch.zeros_like(p_nobg.bg), torch.zeros_like(p_nobg.bg_valid))
    keep, fg_sim, bg_sim = mask_prototype_match(feats, low, p_nobg, valid)
    assert keep.tolist() == [True, False] and bool((bg_sim == bg_sim[0]).all())
