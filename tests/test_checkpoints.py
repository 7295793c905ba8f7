"""Checkpoint files are recognised or refused with one clear sentence; devices and precisions resolve or refuse.

The test files are small and written here: random bytes, a truncated checkpoint, text, a zip of something else,
pickled Python objects, a state dict shaped like SAM ViT-L (only the tensors that tell what it is), and the
embedded model's own state dict (a complete TinyViT/MobileSAM-shaped checkpoint).
"""

import zipfile

import numpy as np
import pytest
import torch

from core.errors import ModelError
from core.modeling import checkpoints
from core.modeling.registry import build_sam


def _refusal(path, name="vit_b") -> str:
    with pytest.raises(ModelError) as info:
        build_sam(name, checkpoint=path)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".") and "Traceback" not in message
    assert len(message) < 300
    return message


@pytest.fixture(scope="module")
def embedded_state_dict():
    from core.modeling.setup_model import load_embedded_state_dict

    return load_embedded_state_dict()


@pytest.fixture(scope="module")
def vit_t_file(tmp_path_factory, embedded_state_dict):
    """A complete, valid MobileSAM-shaped checkpoint (the embedded weights) - not an official file."""
    path = tmp_path_factory.mktemp("ckpt") / "my_mobile_sam.pt"
    torch.save(embedded_state_dict, path)
    return path


def test_missing_path(tmp_path):
    assert "does not exist" in _refusal(tmp_path / "nowhere" / "sam_vit_b_01ec64.pth")


def test_no_checkpoint_given():
    assert "needs its checkpoint file" in _refusal(None)


def test_folder(tmp_path):
    assert "is a folder" in _refusal(tmp_path)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.pth"
    p.write_bytes(b"")
    assert "is empty" in _refusal(p)


def test_random_bytes(tmp_path):
    p = tmp_path / "random.pth"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    assert "not a readable PyTorch checkpoint" in _refusal(p)


def test_text_file(tmp_path):
    p = tmp_path / "notes.pth"
    p.write_text("this is not a model\n" * 50)
    assert "not a readable PyTorch checkpoint" in _refusal(p)


def test_truncated_checkpoint(tmp_path):
    full = tmp_path / "full.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, full)
    data = full.read_bytes()
    p = tmp_path / "truncated.pth"
    p.write_bytes(data[: len(data) // 2])
    assert "not a readable PyTorch checkpoint" in _refusal(p)
    official = tmp_path / "sam_vit_b_01ec64.pth"  # an interrupted download of the official file
    official.write_bytes(data[: len(data) // 2])
    assert "download is probably incomplete" in _refusal(official)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    p = tmp_path / "weights.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "sam_vit_b_01ec64.pth is inside the other archive")
    assert "zip archive but not a PyTorch checkpoint" in _refusal(p)


class Opaque:  # pickled as a Python object: weights_only refuses it
    pass


def test_python_objects_are_not_unpickled(tmp_path):
    p = tmp_path / "pickled.pth"
    torch.save({"model": Opaque(), "x": torch.zeros(2)}, p)
    assert "Python objects besides tensors" in _refusal(p)


def test_vit_l_file_chosen_as_vit_b(tmp_path):
    p = tmp_path / "large.pth"
    torch.save(
        {
            "image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16),
            "image_encoder.blocks.23.norm1.weight": torch.ones(1024),
            "mask_decoder.iou_token.weight": torch.zeros(1, 256),
        },
        p,
    )
    message = _refusal(p, "vit_b")
    assert "looks like a SAM ViT-L (vit_l) checkpoint, not SAM ViT-B (vit_b)" in message
    assert "choose the model 'vit_l'" in message


def test_vit_h_blocks_without_patch_embed(tmp_path):
    p = tmp_path / "deep.pth"
    torch.save({f"image_encoder.blocks.{i}.norm1.bias": torch.zeros(4) for i in range(32)}, p)
    assert "looks like a SAM ViT-H" in _refusal(p, "vit_l")


def test_mobile_sam_file_chosen_as_vit_b(vit_t_file):
    assert "looks like a MobileSAM (vit_t) checkpoint" in _refusal(vit_t_file, "vit_b")


def test_sam2_file(tmp_path):
    p = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7)}, p)
    assert "SAM 2" in _refusal(p, "vit_b")


def test_unrelated_state_dict(tmp_path):
    p = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(1000)}, p)
    assert "none of its tensors has the model's names" in _refusal(p, "vit_t")


def test_damaged_state_dict(tmp_path, embedded_state_dict):
    sd = dict(embedded_state_dict)
    sd.pop("mask_decoder.iou_token.weight")
    sd["image_encoder.neck.0.weight"] = torch.zeros(256, 160, 1, 1)
    p = tmp_path / "edited.pt"
    torch.save(sd, p)
    message = _refusal(p, "vit_t")
    assert message.startswith(f"{p} does not fit MobileSAM (vit_t): 1 tensors are missing")
    assert "image_encoder.neck.0.weight (256, 160, 1, 1), expected (256, 320, 1, 1)" in message


def test_valid_unknown_checkpoint_loads_frozen(vit_t_file, embedded_sam):
    sam = build_sam("vit_t", checkpoint=str(vit_t_file))
    assert not sam.training and all(not p.requires_grad for p in sam.parameters())
    ref = embedded_sam.state_dict()
    for k, v in sam.state_dict().items():
        assert torch.equal(v.cpu(), ref[k].cpu()), k
    # cached attention biases rebuilt from the loaded tables
    attn = sam.image_encoder.layers[1].blocks[0].attn
    assert torch.equal(attn.ab, attn.attention_biases[:, attn.attention_bias_idxs])


def test_mobile_sam_with_its_classifier_head_loads(tmp_path, embedded_state_dict):
    sd = dict(embedded_state_dict)  # mobile_sam.pt carries TinyViT's unused ImageNet head
    sd["image_encoder.head.weight"] = torch.zeros(1000, 320)
    sd["image_encoder.head.bias"] = torch.zeros(1000)
    sd["image_encoder.norm_head.weight"] = torch.ones(320)
    sd["image_encoder.norm_head.bias"] = torch.zeros(320)
    p = tmp_path / "with_head.pt"
    torch.save(sd, p)
    sam = build_sam("vit_t", checkpoint=p)
    assert "image_encoder.head.weight" not in sam.state_dict()


def test_unknown_vit_b_file_loads_without_a_random_init(tmp_path):
    """A complete ViT-B-shaped file (random values, 94 M parameters) is checked, then loaded as it is."""
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in checkpoints.expected_shapes("vit_b").items()}
    p = tmp_path / "finetuned_vit_b.pth"
    torch.save(sd, p)
    sam = build_sam("vit_b", checkpoint=p)
    assert not sam.training and all(not q.requires_grad for q in sam.parameters())
    assert all(not t.is_meta for t in list(sam.parameters()) + list(sam.buffers()))
    assert torch.equal(sam.image_encoder.blocks[11].attn.qkv.weight, sd["image_encoder.blocks.11.attn.qkv.weight"])
    assert torch.allclose(sam.pixel_mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))
    with torch.no_grad():  # the prompt side runs (the 1024 ViT-B encoder itself is too slow for this test)
        sparse, dense = sam.prompt_encoder(points=None, boxes=torch.tensor([[10.0, 10.0, 200.0, 300.0]]), masks=None)
        low, iou = sam.mask_decoder(torch.randn(1, 256, 64, 64), sam.prompt_encoder.get_dense_pe(), sparse, dense, True)
    assert low.shape == (1, 3, 256, 256) and torch.isfinite(low).all()
    del sd, sam
    assert "looks like a SAM ViT-B (vit_b) checkpoint, not SAM ViT-L" in _refusal(p, "vit_l")


def test_known_hash_of_another_model_is_named(vit_t_file, monkeypatch):
    digest = checkpoints.sha256_file(vit_t_file)
    monkeypatch.setitem(checkpoints.KNOWN_CHECKPOINTS, digest, ("vit_h", "sam_vit_h_4b8939.pth"))
    message = _refusal(vit_t_file, "vit_t")
    assert "is the official SAM ViT-H (vit_h) checkpoint (sam_vit_h_4b8939.pth), not MobileSAM (vit_t)" in message
    assert checkpoints.identify(vit_t_file) == ("vit_h", "sam_vit_h_4b8939.pth")


def test_known_hashes_cover_the_official_files():
    names = sorted(v[1] for v in checkpoints.KNOWN_CHECKPOINTS.values())
    assert names == ["mobile_sam.pt", "sam_vit_b_01ec64.pth", "sam_vit_h_4b8939.pth", "sam_vit_l_0b3195.pth"]
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in checkpoints.KNOWN_CHECKPOINTS)


def test_unknown_model_name():
    with pytest.raises(ModelError, match="Unknown model 'vit_x'"):
        build_sam("vit_x")


@pytest.mark.parametrize("name,width,depth", [("vit_b", 768, 12), ("vit_l", 1024, 24), ("vit_h", 1280, 32)])
def test_expected_shapes_of_meta_sam(name, width, depth):
    shapes = checkpoints.expected_shapes(name)
    assert shapes["image_encoder.patch_embed.proj.weight"] == (width, 3, 16, 16)
    assert f"image_encoder.blocks.{depth - 1}.mlp.lin2.bias" in shapes
    assert f"image_encoder.blocks.{depth}.mlp.lin2.bias" not in shapes


# -- device and precision ----------------------------------------------------------------------------------------
from core import device as dev  # noqa: E402


def test_auto_device_follows_cuda(monkeypatch):
    monkeypatch.setattr(dev, "cuda_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(dev, "cuda_available", lambda: True)
    assert dev.resolve_device("auto") == torch.device("cuda")
    assert dev.resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(dev, "cuda_available", lambda: False)
    with pytest.raises(ModelError, match="no CUDA GPU is available"):
        dev.resolve_device("cuda")
    with pytest.raises(ModelError, match="Unknown device 'tpu'"):
        dev.resolve_device("tpu")


def test_precisions_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert dev.resolve_precision("fp32", cpu) == torch.float32
    with pytest.raises(ModelError, match="fp16 runs on CUDA GPUs only"):
        dev.resolve_precision("fp16", cpu)
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: True)
    assert dev.resolve_precision("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: False)
    with pytest.raises(ModelError, match="no native bf16 support"):
        dev.resolve_precision("bf16", cpu)
    with pytest.raises(ModelError, match="Unknown precision 'int8'"):
        dev.resolve_precision("int8", cpu)


def test_engine_refuses_fp16_on_cpu(embedded_sam):
    from core.modeling.engine import SamEngine

    with pytest.raises(ModelError, match="fp16"):
        SamEngine(embedded_sam, device="cpu", precision="fp16")


def test_set_threads():
    before = torch.get_num_threads()
    try:
        dev.set_threads(0)
        assert torch.get_num_threads() == before
        dev.set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
