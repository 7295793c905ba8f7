"""The converted DINOv2 ViT-S/14 reproduces the ONNX graph's final-norm tokens on a real image.

Tolerance: max |torch - onnxruntime| <= 1e-3 on tokens whose magnitude reaches ~8 (measured: ~3e-5), and the
cosine similarity of every token >= 0.9999 (measured: 0.9999998), at 448 px and at 224 px.
"""

import numpy as np
import pytest
import torch

from core.modeling import semantic_backbone as sb
from core.training.episodes import read_image


@pytest.fixture(scope="module")
def backbone():
    return sb.SemanticBackbone(size=448, device="cpu")


@pytest.fixture(scope="module")
def ort_session():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(sb.find_onnx()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(sb.FINAL_TOKENS, onnx.TensorProto.FLOAT, None))
    dims = model.graph.input[0].type.tensor_type.shape.dim  # the export declares 224x224; the graph is dynamic
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def image(shared_data):
    return read_image(shared_data / "nwpu_vhr10_dev" / "images" / "081.jpg")


@pytest.mark.parametrize("size", [448, 224])
def test_matches_onnxruntime(backbone, ort_session, image, size):
    bb = sb.SemanticBackbone.__new__(sb.SemanticBackbone)
    bb.__dict__.update(backbone.__dict__)
    bb.size = size
    x = bb.prepare(image)
    ref = ort_session.run([sb.FINAL_TOKENS], {"input_image": x.numpy()})[0]
    out = bb.tokens(x).numpy()
    assert out.shape == ref.shape == (1, 1 + (size // 14) ** 2, 384)
    assert np.abs(out - ref).max() <= 1e-3
    cos = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() >= 0.9999


def test_feature_api(backbone, image):
    f = backbone.features(image)
    assert f.shape == (1, 384, 32, 32) and f.dtype == torch.float32
    assert backbone.grid == 32
    h, w = image.shape[:2]  # 704 x 1075: letterboxed to 293 x 448 -> 21 token rows cover the image
    assert backbone.letterbox_hw((h, w)) == (293, 448)
    assert backbone.valid_grid((h, w)) == (21, 32)
    batch = torch.from_numpy(np.stack([image, image[::-1].copy()])).permute(0, 3, 1, 2)
    fb = backbone.features(batch)
    assert fb.shape == (2, 384, 32, 32)
    assert torch.allclose(fb[0], f[0], atol=1e-4)
    assert not torch.allclose(fb[1], f[0], atol=1e-2)
    assert all(not p.requires_grad for p in backbone.net.parameters())


def test_cache_is_reused(backbone):
    path = sb.cache_dir() / sb.CACHE_NAME
    assert path.is_file()
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert blob["format"] == sb.CACHE_FORMAT and len(blob["source_sha256"]) == 64
    sd = sb.load_state_dict()
    assert torch.equal(sd["pos_embed"], backbone.net.pos_embed.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(backbone, image):
    gpu = sb.SemanticBackbone(size=448, device="cuda")
    assert torch.allclose(gpu.features(image).cpu(), backbone.features(image), atol=1e-2)
