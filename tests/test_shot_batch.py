"""The K-shot ensemble's prompt sets decoded together (issue #21): same numbers as one by one.

Real embedded SAM, the real shipped adapters, real tiles (the Kampala reference with its OSM buildings, two
Zanzibar targets of the OpenAerialMap mosaics: ``kampala_episode``). The one-crop reference gives four prompt sets
per tile (joint prototypes, the reference, its two zoomed views); ``ViRefSAM.shot_ensemble`` refines the shots'
prototype tables in one call, projects the image's keys and values once for all query sets and gives the mask
decoder all sets in one call. Here it is compared with the per-set path it replaced, written out from the same
parts (:meth:`ViRefSAM.refine`, :func:`pseudo_mask`, :meth:`ViRefSAM._decode` one set at a time).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from core.modeling.predictor import ReferencePredictor
from core.modeling.prototypes import pseudo_mask
from core.modeling.vcp import _cross_attention

ADAPTERS = Path(__file__).resolve().parent.parent / "resources" / "adapters" / "embedded_virefsam.pt"


def _one_by_one(model, t, protos, shots):
    """The ensemble as it was computed before: each prompt set refined, masked and decoded on its own."""
    plain, valid = t.plain, t.valid
    pe = model.sam.prompt_encoder.get_dense_pe().to(plain.dtype)
    out = model(t.x, protos, plain=plain, valid=valid, stem=t.stem)  # the joint prototypes alone
    probs = [torch.sigmoid(out["low_res_logits"][:, :1].float())]
    emb = out["embedding"]
    for p in shots:
        _, r = model.refine(p.to(device=plain.device, dtype=plain.dtype), plain, pe, valid)
        pm, mg, _ = pseudo_mask(plain, r, valid)
        probs.append(torch.sigmoid(model._decode(r.fg, pm, mg, emb, pe, valid)["low_res_logits"][:, :1].float()))
    return torch.stack(probs).mean(0)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_batched_ensemble_equals_one_set_at_a_time(embedded_sam, kampala_episode, backend):
    """With the PyTorch decoder and with the ONNX Runtime graph: the batched ensemble's probabilities equal the
    one-by-one path's within 1e-4 on both tiles (the same masks), with one decoder call per tile for the four
    prompt sets."""
    from core.modeling.engine import SamEngine

    eng = SamEngine(embedded_sam, device="cpu", precision="fp32", encoder_backend=backend)
    pred = ReferencePredictor(eng, mode="virefsam", adapters=ADAPTERS)
    model = pred.model
    assert (model.decoder_runner is not None) == (backend == "onnxruntime")
    ref, tiles = kampala_episode
    pred.set_references([ref])
    assert len(pred._shots) == 3  # the reference and its two zoomed views

    calls = []
    real_decoder = model.sam.mask_decoder.forward
    real_runner = model.decoder_runner

    def counting_decoder(*a, **k):
        calls.append(k["sparse_prompt_embeddings"].shape[0])
        return real_decoder(*a, **k)

    def counting_runner(emb, sparse, dense):
        calls.append(sparse.shape[0])
        return real_runner(emb, sparse, dense)

    for tile in tiles:
        with torch.inference_mode():
            t = pred._encode([tile])[0]
            calls.clear()
            if real_runner is None:
                model.sam.mask_decoder.forward = counting_decoder
            else:
                model.decoder_runner = counting_runner
            try:
                batched = model(t.x, pred._protos, plain=t.plain, valid=t.valid, stem=t.stem, shots=pred._shots)
            finally:
                model.sam.mask_decoder.forward = real_decoder
                model.decoder_runner = real_runner
            assert calls == [4]  # joint + 3 shots, one call
            fast = torch.sigmoid(batched["low_res_logits"].float())
            exact = _one_by_one(model, t, pred._protos, pred._shots)
        assert float((fast - exact).abs().max()) < 1e-4
        a, b = fast > 0.5, exact > 0.5
        assert int(b.sum()) > 1000  # houses found on the tile
        assert int((a ^ b).sum()) <= 0.001 * int((a | b).sum())
        assert batched["pseudo_mask"].shape == (1, 64, 64)  # the joint prototypes' entries, as without shots


def test_shared_keys_cross_attention_is_multihead_attention(embedded_sam, zanzibar_embedding):
    """The queries' mask-constrained cross-attention (:func:`core.modeling.vcp._cross_attention`) with the shipped
    VCP weights equals ``nn.MultiheadAttention`` with the blocked cells masked, for one image per query set and
    for one image shared by three sets, on a real embedding."""
    from core.modeling.virefsam import ViRefSAM

    vcp = ViRefSAM.from_adapters(embedded_sam, ADAPTERS).vcp.eval()
    emb = zanzibar_embedding[2].float()
    mem = vcp.norm_mem(emb.flatten(2).transpose(1, 2))  # 1 x 4096 x 256
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 64, 256, generator=g)
    allowed = torch.rand(3, 4096, generator=g) < 0.2
    with torch.no_grad():
        shared = _cross_attention(vcp.cross_attn, q, mem, mem, allowed)
        own = _cross_attention(vcp.cross_attn, q, mem.expand(3, -1, -1), mem.expand(3, -1, -1), allowed)
        blocked = (~allowed)[:, None, :].expand(3, 64, 4096).repeat_interleave(vcp.heads, dim=0)
        ref, _ = vcp.cross_attn(q, mem.expand(3, -1, -1), mem.expand(3, -1, -1), attn_mask=blocked,
                                need_weights=False)
    assert float((shared - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    assert float((own - ref).abs().max()) < 1e-4 * float(ref.abs().max())
