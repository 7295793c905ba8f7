"""SamEngine's steps: preprocessing geometry, batching rules of decode, extra sparse prompts, postprocess.

Uses the session's zanzibar tile (1024x768 -> padded to 1024x1024) and its one embedding.
"""

import numpy as np
import pytest
import torch

from core.errors import InputError

BOXES = np.array([[300.0, 250.0, 560.0, 520.0], [600.0, 100.0, 800.0, 300.0]])


def test_preprocess_resizes_normalises_and_pads(engine, zanzibar_tile, zanzibar_embedding):
    image = zanzibar_tile[0]
    x, input_size, _ = zanzibar_embedding
    assert x.shape == (1, 3, 1024, 1024) and x.dtype == torch.float32
    assert input_size == (768, 1024)
    assert torch.all(x[..., 768:, :] == 0)  # padding at the bottom, after normalisation
    mean, std = engine.sam.pixel_mean.flatten(), engine.sam.pixel_std.flatten()
    expected = (torch.as_tensor(image[10, 20], dtype=torch.float32) - mean) / std
    assert torch.allclose(x[0, :, 10, 20], expected)
    small = np.zeros((300, 500, 3), np.uint8)
    x2, size2 = engine.preprocess(small)
    assert x2.shape == (1, 3, 1024, 1024) and size2 == (614, 1024) == engine.input_size((300, 500))


def test_preprocess_refuses_other_images(engine):
    with pytest.raises(InputError, match="HxWx3 uint8"):
        engine.preprocess(np.zeros((64, 64), np.uint8))
    with pytest.raises(InputError, match="HxWx3 uint8"):
        engine.preprocess(np.zeros((64, 64, 3), np.float32))


def test_coordinates_follow_the_resize(engine):
    pts = engine.transform_coords(np.array([[100.0, 50.0], [499.0, 299.0]]), (300, 500))
    np.testing.assert_allclose(pts, [[204.8, 50 * 614 / 300], [499 * 2.048, 299 * 614 / 300]])
    boxes = engine.transform_boxes(torch.tensor([[0.0, 0.0, 500.0, 300.0]]), (300, 500))
    assert torch.allclose(boxes, torch.tensor([[0.0, 0.0, 1024.0, 614.0]]))


def test_one_embedding_many_prompts_equals_pairs(engine, zanzibar_embedding):
    emb = zanzibar_embedding[2]
    low, iou = engine.decode(emb, boxes=BOXES, multimask=True)
    assert low.shape == (2, 3, 256, 256) and iou.shape == (2, 3)
    low2, iou2 = engine.decode(emb.expand(2, -1, -1, -1), boxes=BOXES, multimask=True)
    one, one_iou = engine.decode(emb, boxes=BOXES[1:])
    assert torch.allclose(low, low2, atol=1e-4) and torch.allclose(iou, iou2, atol=1e-5)
    low_single, _ = engine.decode(emb, boxes=BOXES)
    assert torch.allclose(low_single[1:], one, atol=1e-4)
    with pytest.raises(ValueError, match="3 image embeddings for 2 prompts"):
        engine.decode(emb.expand(3, -1, -1, -1), boxes=BOXES)


def test_sparse_extra_is_appended_and_trainable(engine, zanzibar_embedding):
    emb = zanzibar_embedding[2]
    points = (torch.tensor([[[430.0, 380.0]]]).expand(2, -1, -1), torch.ones(2, 1, dtype=torch.long))
    base, _ = engine.decode(emb, points=points)
    zeros = torch.zeros(2, 3, 256)
    with_extra, _ = engine.decode(emb, points=points, sparse_extra=zeros)
    assert with_extra.shape == base.shape == (2, 1, 256, 256)
    assert not torch.allclose(with_extra, base)  # three more tokens attend in the decoder
    extra = torch.zeros(2, 3, 256, requires_grad=True)
    low, iou = engine.decode(emb, sparse_extra=extra)  # prompts made of extra embeddings only
    (low.mean() + iou.mean()).backward()
    assert extra.grad is not None and extra.grad.abs().sum() > 0
    assert all(p.grad is None for p in engine.sam.parameters())  # SAM stays frozen


def test_postprocess_returns_original_size(engine, zanzibar_tile, zanzibar_embedding):
    _, input_size, emb = zanzibar_embedding
    low, _ = engine.decode(emb, boxes=BOXES, multimask=True)
    logits = engine.postprocess(low, input_size, zanzibar_tile[0].shape[:2])
    assert logits.shape == (2, 3, 768, 1024)
    inside = logits[0, :, 300:450, 350:500].mean()
    assert torch.isfinite(logits).all() and inside > logits[0, :, :100, 900:].mean()
