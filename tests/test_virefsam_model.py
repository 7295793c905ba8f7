"""ViRefSAM on the real SAM modules with random weights: DTA zero-init identity (TinyViT and ViT), frozen SAM
under training, shapes for K = 1 and K = 3, adapter files and their refusal for another backbone."""

import copy

import pytest
import torch

from core.errors import ModelError
from core.modeling.dta import AdaptedEncoder, DTAContext
from core.modeling.registry import build_architecture, freeze
from core.modeling.virefsam import ViRefSAM


@pytest.fixture(scope="module")
def tinyvit_sam():
    """segment_anything Sam with MobileSAM's TinyViT encoder (the embedded model's architecture), random init."""
    torch.manual_seed(0)
    return freeze(build_architecture("embedded"))


@pytest.fixture(scope="module")
def small_vit_sam():
    """segment_anything Sam with a narrow 2-block ViT encoder (one windowed + one global block, rel. pos)."""
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(0)
    sam = build_architecture("vit_b")
    sam.image_encoder = ImageEncoderViT(
        depth=2, embed_dim=64, num_heads=2, img_size=1024, patch_size=16, use_rel_pos=True,
        window_size=14, global_attn_indexes=(1,), out_chans=256,
    )
    return freeze(sam)


def _context(b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DTAContext(torch.randn(b, 6, 256, generator=g), torch.randint(0, 7, (b, 64, 64), generator=g))


def _randomise_up(adapted):
    with torch.no_grad():
        for ad in adapted.adapters:
            ad.up.weight.normal_(0, 0.02)


def test_dta_zero_init_tinyvit_equals_plain_encoder(tinyvit_sam):
    enc = tinyvit_sam.image_encoder
    adapted = AdaptedEncoder(enc)
    assert adapted.kind == "tinyvit"
    assert adapted.dims == [128, 128, 160, 160, 160, 160, 160, 160, 320, 320]
    assert adapted.grids[:3] == [(128, 128), (128, 128), (64, 64)]
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = enc(x)
        out = adapted(x, _context())
        assert out.shape == (1, 256, 64, 64)
        assert torch.equal(out, plain)  # bit-identical, max abs diff 0


def test_dta_zero_init_vit_b_blocks_equal_plain_encoder():
    """ViT-B's block configuration (768 wide, 12 heads, rel. pos., 14x14 windows + a global block); 2 blocks
    at 512 px (32x32 tokens, so the windows are padded) to keep the test short."""
    from segment_anything.modeling import ImageEncoderViT

    from core.modeling.registry import VIT_CONFIGS

    torch.manual_seed(0)
    cfg = VIT_CONFIGS["vit_b"]
    enc = ImageEncoderViT(
        depth=2, embed_dim=cfg["embed_dim"], num_heads=cfg["num_heads"], img_size=512, patch_size=16,
        mlp_ratio=4, qkv_bias=True, use_rel_pos=True, window_size=14, global_attn_indexes=(1,), out_chans=256,
        norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
    ).eval()
    adapted = AdaptedEncoder(enc)
    assert adapted.kind == "vit" and adapted.dims == [768, 768] and adapted.grids == [(32, 32), (32, 32)]
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        plain = enc(x)
        assert torch.equal(adapted(x, _context()), plain)  # assignment given at 64x64, resampled to 32x32


def test_dta_zero_init_small_vit_equals_plain(small_vit_sam):
    adapted = AdaptedEncoder(small_vit_sam.image_encoder)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.inference_mode():
        plain = small_vit_sam.image_encoder(x)
        assert torch.equal(adapted(x, _context()), plain)
        _randomise_up(adapted)
        assert not torch.allclose(adapted(x, _context()), plain)  # the branch is wired in


def _refs(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, 3, 1024, 1024, generator=g)
    m = torch.zeros(k, 1024, 1024)
    for i in range(k):
        m[i, 100 + 50 * i : 400, 200 : 500 + 30 * i] = 1
    return x, m


@pytest.mark.parametrize("k", [1, 3])
def test_shapes_k_shots(small_vit_sam, k):
    model = ViRefSAM(small_vit_sam)
    rx, rm = _refs(k)
    feats = model.encode_plain(rx)
    valid = torch.ones(k, 64, 64, dtype=torch.bool)
    protos = model.reference_prototypes(feats, rm, valid)
    assert protos.fg.shape == (1, 256) and protos.bg.shape == (1, 5, 256) and bool(protos.bg_valid.all())
    x = torch.randn(2, 3, 1024, 1024)
    tvalid = torch.ones(2, 64, 64, dtype=torch.bool)
    tvalid[1, :, 40:] = False  # second target padded on the right
    with torch.no_grad():
        out = model(x, protos, valid=tvalid)
    assert out["low_res_logits"].shape == (2, 1, 256, 256)
    assert out["iou"].shape == (2, 1)
    assert out["pseudo_mask"].shape == (2, 64, 64) and out["pseudo_mask"].dtype == torch.bool
    assert out["mask_input"].shape == (2, 1, 256, 256)
    assert out["l_reg"].shape == () and 0 <= float(out["l_reg"]) <= 1
    assert not bool(out["pseudo_mask"][1, :, 40:].any())
    assert torch.isfinite(out["low_res_logits"]).all()


def test_one_step_trains_adapters_and_leaves_sam_frozen(tinyvit_sam):
    torch.manual_seed(0)
    model = ViRefSAM(tinyvit_sam).train()
    assert not tinyvit_sam.training and model.vcp.training  # SAM stays in eval mode
    before = {k: v.clone() for k, v in tinyvit_sam.state_dict().items()}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in model.trainable_parameters()} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    assert all(not p.requires_grad for p in tinyvit_sam.parameters())

    rx, rm = _refs(1)
    protos = model.reference_prototypes(model.encode_plain(rx), rm)
    x = torch.randn(1, 3, 1024, 1024)
    target = torch.zeros(1, 1, 256, 256)
    target[..., 64:128, 64:160] = 1
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    out = model(x, protos)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out["low_res_logits"], target) + out["l_reg"]
    loss.backward()
    opt.step()

    assert all(p.grad is None for p in tinyvit_sam.parameters())
    after = tinyvit_sam.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # every trainable tensor is in the graph
    assert all(p.grad is not None for p in model.trainable_parameters())
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable_before[n])}
    # each DTA branch's zero-initialised up-projection moves first (the rest of a branch gets gradient once
    # ``up`` is non-zero); the VCP query decoder, queries and the mask-logit scale move at once
    for i in range(len(model.encoder.adapters)):
        assert f"encoder.adapters.{i}.up.weight" in changed
    for name in ("vcp.query_embed", "vcp.cross_attn.in_proj_weight", "vcp.self_attn.in_proj_weight",
                 "vcp.out_proj.weight", "vcp.fg_proj.weight", "vcp.mask_scale",
                 "vcp.refiner.attn.out_proj.weight"):
        assert name in changed, name


def test_adapter_file_roundtrip_and_refusals(tmp_path, tinyvit_sam, small_vit_sam):
    model = ViRefSAM(tinyvit_sam)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "adapters.pt"
    model.save_adapters(path)

    again = ViRefSAM.from_adapters(tinyvit_sam, path)
    for (n, a), b in zip(model.adapter_state_dict()["dta"].items(), again.adapter_state_dict()["dta"].values()):
        assert torch.equal(a, b), n
    assert torch.equal(again.vcp.query_embed, model.vcp.query_embed)

    with pytest.raises(ModelError, match="another SAM backbone"):
        ViRefSAM(small_vit_sam).load_adapters(path)
    other = copy.deepcopy(tinyvit_sam)
    with torch.no_grad():
        other.image_encoder.neck[0].weight.mul_(1.5)  # same architecture, other weights
    with pytest.raises(ModelError, match="other weights"):
        ViRefSAM(other).load_adapters(path)
    with pytest.raises(ModelError, match="configuration"):
        ViRefSAM(tinyvit_sam, n_queries=16).load_adapters(path)
    with pytest.raises(ModelError, match="does not exist"):
        ViRefSAM.from_adapters(tinyvit_sam, tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot be read"):
        ViRefSAM.from_adapters(tinyvit_sam, bad)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="no ViRefSAM adapters"):
        ViRefSAM.from_adapters(tinyvit_sam, tmp_path / "other.pt")


def test_vcp_without_dta_skips_the_adapted_pass_and_equals_zero_adapters(tmp_path, small_vit_sam):
    """The ablation "VCP without DTA" (use_dta False) gives exactly what zero DTA branches give, without the
    adapted encoder pass; adapter files trained with --no-dta come back with use_dta False."""
    model = ViRefSAM(small_vit_sam)
    rx, rm = _refs(1)
    protos = model.reference_prototypes(model.encode_plain(rx), rm)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(3))
    plain = model.encode_plain(x)
    with torch.no_grad():
        with_pass = model(x, protos, plain=plain)["low_res_logits"]  # untrained: DTA is an exact no-op
        model.use_dta = False
        calls = []
        hook = model.encoder.register_forward_hook(lambda *a: calls.append(1))
        without = model(x, protos, plain=plain)["low_res_logits"]
        hook.remove()
    assert calls == [] and torch.equal(with_pass, without)

    blob = model.adapter_state_dict()
    blob["training"] = {"dta": False}
    torch.save(blob, tmp_path / "vcp_only.pt")
    assert ViRefSAM.from_adapters(small_vit_sam, tmp_path / "vcp_only.pt").use_dta is False
    blob["training"] = {"dta": True}
    torch.save(blob, tmp_path / "full.pt")
    assert ViRefSAM.from_adapters(small_vit_sam, tmp_path / "full.pt").use_dta is True
