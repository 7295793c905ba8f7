"""SAM's mask decoder for many prompts on ONE image, with the work that does not depend on the prompt done once.

``segment_anything``'s ``MaskDecoder`` repeats the image embedding once per prompt and runs its two-way
transformer and its upscaling on every copy. For N prompts on one image without a mask input (the training-free
mode: one point + box per candidate object, up to 32 per tile) this module computes the same single-mask output
(mask token 0, ``multimask_output=False``) from the same weights, with the same operations regrouped:

* the first block's image-side projections (keys, values of the token-to-image attention, queries of the
  image-to-token attention) act on the shared image embedding, before any prompt touches it: computed once,
  not N times;
* attention values of the image are never materialised per prompt: ``softmax(qk) @ (X Wv + bv)`` is computed
  as ``(softmax(qk) @ X) Wv + bv`` (the softmax rows sum to 1), and the image-to-token attention's output
  projection is applied to the few token values before the attention (``A (V Wo) = (A V) Wo``);
* the image-side projections that share an input run as one matrix product;
* the upscaling (two stride-2 2x2 transposed convolutions with a channel LayerNorm and GELUs) runs as matrix
  products on channels-last pixels, and only mask token 0's hypernetwork output is used;
* the dense positional encoding comes in once per call.

Equal to ``sam.mask_decoder(...)[:, :1]`` up to float32 rounding (low-res logits within ~1e-4 on real
embeddings; see tests/test_shared_decoder.py). :func:`supports` says whether a decoder has the structure this
relies on (SAM's and MobileSAM's ``MaskDecoder`` with a ``TwoWayTransformer``); anything else goes through
the module itself.

``context`` (local decoding, an approximation): each prompt is decoded on its own crop of the image embedding
(and of the dense positional encoding, so every cell keeps its position), as if the tile were only that crop.
SAM's token-to-image attention is a softmax over every image cell, so the masks differ from the whole-tile
ones (per-object IoU ~0.93, union ~0.95 on real tiles), but a 16 x 16 crop instead of 64 x 64 cells makes
the per-prompt work 16x smaller. Measured with the eval command, the accuracy against the truth is unchanged
(docs/BENCH.md, the model card).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def supports(sam) -> bool:
    """Whether ``sam.mask_decoder`` has segment_anything's MaskDecoder / TwoWayTransformer layout (checked by
    structure). Note: forward hooks on ``sam.mask_decoder`` do not fire here (its ``forward`` is not called)."""
    md = getattr(sam, "mask_decoder", None)
    tr = getattr(md, "transformer", None)
    try:
        layers = list(tr.layers)
        if not layers or not layers[0].skip_first_layer_pe or any(layer.skip_first_layer_pe for layer in layers[1:]):
            return False
        for layer in layers:
            for name in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token", "mlp",
                         "norm1", "norm2", "norm3", "norm4"):
                getattr(layer, name)
        for a in [tr.final_attn_token_to_image] + [getattr(layer, n) for layer in layers
                                                   for n in ("cross_attn_token_to_image", "cross_attn_image_to_token")]:
            if not all(isinstance(getattr(a, p), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "out_proj")):
                return False
        up = list(md.output_upscaling)
        if len(up) != 5:
            return False
        ct1, ln, g1, ct2, g2 = up
        for ct in (ct1, ct2):
            if not (type(ct) is nn.ConvTranspose2d and tuple(ct.kernel_size) == (2, 2) and tuple(ct.stride) == (2, 2)
                    and tuple(ct.padding) == (0, 0) and tuple(ct.output_padding) == (0, 0)
                    and tuple(ct.dilation) == (1, 1) and ct.groups == 1 and ct.bias is not None):
                return False
        if type(ln).__name__ != "LayerNorm2d" or not hasattr(ln, "eps"):
            return False
        if not all(type(g) is nn.GELU and g.approximate == "none" for g in (g1, g2)):
            return False
        md.iou_token, md.mask_tokens, md.output_hypernetworks_mlps[0], md.iou_prediction_head  # noqa: B018
    except (AttributeError, TypeError, IndexError):
        return False
    return True


def _token_values_out(attn, queries: torch.Tensor) -> torch.Tensor:
    """The token values already through the output projection, per head: ``v_h Wo_h^T`` -> (N, T*H, C), rows
    in (token, head) order."""
    n, t, _ = queries.shape
    h = attn.num_heads
    v = attn.v_proj(queries).view(n, t, h, -1).transpose(1, 2)  # N, H, T, d
    wo = attn.out_proj.weight.view(attn.out_proj.weight.shape[0], h, -1).permute(1, 2, 0)  # H, d, C
    return (v @ wo).transpose(1, 2).reshape(n, t * h, -1)


def _token_self_attention(layer, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
    """A TwoWayAttentionBlock's first step on the tokens alone (N x T x C): self-attention (without the token
    PE in the first block), residual unless first, norm1."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    return layer.norm1(queries)


def _t2i_shared(attn, qtok: torch.Tensor, k_img: torch.Tensor, v_img: torch.Tensor) -> torch.Tensor:
    """Token-to-image attention of N token sets (``qtok`` N x T x C, with their PE) on ONE image whose keys and
    values (``attn.k_proj(keys + pe)``, ``attn.v_proj(keys)``, L x H*d) were projected once."""
    n, t, _ = qtok.shape
    h = attn.num_heads
    q = attn.q_proj(qtok).view(n * t, h, -1).transpose(0, 1)  # H, N*T, d
    d = q.shape[-1]
    k = k_img.view(-1, h, d).permute(1, 2, 0)  # H, d, L
    w = torch.softmax((q @ k) / math.sqrt(d), dim=-1)  # H, N*T, L
    o = w @ v_img.view(-1, h, d).transpose(0, 1)  # H, N*T, d
    return attn.out_proj(o.view(h, n, t, d).permute(1, 2, 0, 3).reshape(n, t, h * d))


def _i2t_shared(attn, q_img: torch.Tensor, qtok: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Image-to-token attention of ONE image (its queries ``attn.q_proj(keys + pe)`` L x H*d, projected once)
    on N token sets -> N x L x C."""
    n, t, _ = qtok.shape
    h = attn.num_heads
    k = attn.k_proj(qtok).view(n, t, h, -1)
    d = k.shape[-1]
    k = k.permute(2, 3, 1, 0).reshape(h, d, t * n)  # H, d, T*N
    q = q_img.view(-1, h, d).transpose(0, 1)  # H, L, d
    length = q.shape[1]
    # softmax over each set's T tokens, on a dim that is not the innermost (much faster for T ~ 8)
    w = torch.softmax(((q @ k) / math.sqrt(d)).view(h, length, t, n), dim=-2)
    w = w.permute(3, 1, 2, 0).reshape(n, length, t * h)  # N, L, T*H
    return torch.baddbmm(attn.out_proj.bias.view(1, 1, -1), w, _token_values_out(attn, queries))


def _t2i(attn, qtok: torch.Tensor, kp: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Token-to-image attention, N token sets on N images (``kp`` = keys + pe, ``keys``: N x L x C), without
    projecting the image: q.(Wk x + bk) = (Wk^T q).x + const (the constant drops out of the softmax over the
    image), and softmax(.) @ (X Wv^T + bv) = (softmax(.) @ X) Wv^T + bv (its rows sum to 1)."""
    n, t, c = qtok.shape
    h = attn.num_heads
    q = attn.q_proj(qtok).view(n, t, h, -1)
    d = q.shape[-1]
    qk = torch.einsum("nthd,hdc->nhtc", q, attn.k_proj.weight.view(h, d, c)).reshape(n, h * t, c)
    w = torch.softmax((qk @ kp.transpose(1, 2)) / math.sqrt(d), dim=-1)  # N, H*T, L
    wx = (w @ keys).view(n, h, t, c)
    o = wx @ attn.v_proj.weight.view(h, d, c).transpose(-1, -2) + attn.v_proj.bias.view(h, 1, d)  # N, H, T, d
    return attn.out_proj(o.transpose(1, 2).reshape(n, t, h * d))


def _i2t(attn, kp: torch.Tensor, qtok: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Image-to-token attention, N images (``kp`` = keys + pe, N x L x C) on their N token sets, without
    projecting the image: (Wq x + bq).k = x.(Wq^T k) + bq.k."""
    n, t, c = qtok.shape
    h = attn.num_heads
    k = attn.k_proj(qtok).view(n, t, h, -1)
    d = k.shape[-1]
    kq = torch.einsum("nthd,hdc->nthc", k, attn.q_proj.weight.view(h, d, c)).reshape(n, t * h, c)
    bias = torch.einsum("nthd,hd->nth", k, attn.q_proj.bias.view(h, d)).reshape(n, 1, t * h)
    logits = torch.baddbmm(bias, kp, kq.transpose(1, 2)) / math.sqrt(d)  # N, L, T*H
    length = logits.shape[1]
    # softmax over each set's T tokens, on a dim that is not the innermost (much faster for T ~ 8)
    w = torch.softmax(logits.view(n, length, t, h), dim=-2).view(n, length, t * h)
    return torch.baddbmm(attn.out_proj.bias.view(1, 1, -1), w, _token_values_out(attn, queries))


def _upscaled_mask(md, src: torch.Tensor, hyper: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``(hyper @ output_upscaling(src)).`` for one mask token: src (N, L, C) channels-last pixels of an
    h x w grid, hyper (N, C2) -> (N, 4h, 4w)."""
    ct1, ln, _, ct2, _ = md.output_upscaling
    n, length, c = src.shape
    h, w = size
    c1, c2 = ct1.out_channels, ct2.out_channels
    w1 = ct1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c1)  # (c_in, (i, j, c_out))
    a = torch.addmm(ct1.bias.repeat(4), src.reshape(-1, c), w1).view(-1, c1)  # (N L 4, c1)
    a = F.gelu(F.layer_norm(a, (c1,), ln.weight, ln.bias, ln.eps))
    w2 = ct2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
    b = F.gelu(torch.addmm(ct2.bias.repeat(4), a, w2))  # (N L 4, 4 c2)
    m = (b.view(n, length * 16, c2) @ hyper[:, :, None]).view(n, h, w, 2, 2, 2, 2)  # n h w i j i2 j2
    return m.permute(0, 1, 3, 5, 2, 4, 6).reshape(n, 4 * h, 4 * w)


def _upscaled_mask_windows(md, src: torch.Tensor, hyper: torch.Tensor, size: Tuple[int, int],
                           windows: torch.Tensor, fill: float) -> torch.Tensor:
    """:func:`_upscaled_mask` inside one window per prompt (``windows`` N x 4 = row0, col0, row1, col1 of the
    h x w grid), ``fill`` outside. The upscaling is pixel-local (2x2 stride-2 transposed convolutions, a
    per-pixel channel LayerNorm, GELUs), so inside its window each mask equals the full computation exactly."""
    n, _, c = src.shape
    h, w = size
    grid = src.view(n, h, w, c)
    out = src.new_full((n, 4 * h, 4 * w), fill)
    for i, (r0, c0, r1, c1) in enumerate(windows.tolist()):
        if r1 <= r0 or c1 <= c0:
            continue
        crop = grid[i, r0:r1, c0:c1].reshape(1, -1, c)
        out[i, 4 * r0 : 4 * r1, 4 * c0 : 4 * c1] = _upscaled_mask(md, crop, hyper[i : i + 1], (r1 - r0, c1 - c0))[0]
    return out


def _decode_in_context(sam, tokens: torch.Tensor, src: torch.Tensor, image_pe: torch.Tensor,
                       context: torch.Tensor, fill: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's tokens (N x T x C) decoded on its own crop of the image: ``context`` N x 4 windows (row0,
    col0, row1, col1), src / image_pe 1 x C x h x w. -> logits N x 4h x 4w (``fill`` outside the crop), iou N.

    Prompts whose crops have one size share the image-side work (one batch per size); the token-side work
    (self-attention, MLPs, norms, output heads) runs once for all N prompts."""
    md = sam.mask_decoder
    tr = md.transformer
    n, _, c = tokens.shape
    h, w = src.shape[-2:]
    flat, flat_pe = src[0].flatten(1).t(), image_pe[0].flatten(1).t()  # L, C
    sizes = (context[:, 2] - context[:, 0]) * (w + 1) + (context[:, 3] - context[:, 1])
    groups = []  # (prompt ids, (ch, cw), keys, pe) per crop size
    for size in torch.unique(sizes).tolist():
        ids = torch.nonzero(sizes == size)[:, 0]
        ch, cw = int(context[ids[0], 2] - context[ids[0], 0]), int(context[ids[0], 3] - context[ids[0], 1])
        rows = (context[ids, :1] + torch.arange(ch)).view(-1, ch, 1)
        cols = (context[ids, 1:2] + torch.arange(cw)).view(-1, 1, cw)
        idx = (rows * w + cols).reshape(len(ids), ch * cw).to(src.device)  # flat indices of each crop
        groups.append([ids.to(src.device), (ch, cw), flat[idx], flat_pe[idx]])

    def per_group(fn, x: torch.Tensor) -> torch.Tensor:
        """x N x T x C -> fn(group, x[group ids]) scattered back into N x T x C."""
        if len(groups) == 1:
            return fn(groups[0], x)
        out = None
        for g in groups:
            part = fn(g, x[g[0]])
            if out is None:  # autocast may change the dtype
                out = x.new_empty(x.shape, dtype=part.dtype)
            out[g[0]] = part
        return out

    queries, query_pe = tokens, tokens
    for layer in tr.layers:
        queries = _token_self_attention(layer, queries, query_pe)
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        queries = layer.norm2(queries + per_group(lambda g, qq: _t2i(t2i, qq, g[2] + g[3], g[2]),
                                                  queries + query_pe))
        queries = layer.norm3(queries + layer.mlp(queries))
        qp = queries + query_pe
        for g in groups:
            kp = g[2] + g[3]
            g[2] = layer.norm4(g[2] + _i2t(i2t, kp, qp[g[0]], queries[g[0]]))
    final = tr.final_attn_token_to_image
    queries = tr.norm_final_attn(queries + per_group(lambda g, qq: _t2i(final, qq, g[2] + g[3], g[2]),
                                                     queries + query_pe))
    hyper = md.output_hypernetworks_mlps[0](queries[:, 1])
    out = src.new_full((n, 4 * h, 4 * w), fill)
    for ids, (ch, cw), keys, _ in groups:
        crop = _upscaled_mask(md, keys, hyper[ids], (ch, cw))  # n_g, 4ch, 4cw
        for k, i in enumerate(ids.tolist()):
            r0, c0 = int(context[i, 0]), int(context[i, 1])
            out[i, 4 * r0 : 4 * (r0 + ch), 4 * c0 : 4 * (c0 + cw)] = crop[k]
    iou = md.iou_prediction_head(queries[:, 0])[:, 0]
    return out, iou


def decode_single_mask(sam, emb: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                       dense: torch.Tensor, windows: Optional[torch.Tensor] = None,
                       fill: float = -20.0,
                       context: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Like ``sam.mask_decoder(emb, image_pe, sparse, dense, multimask_output=False)`` for N prompts on one image.

    emb, image_pe: 1 x C x h x w; sparse: N x S x C; dense: 1 x C x h x w or N x C x h x w with equal rows (no
    mask input: the prompt encoder's ``no_mask_embed``, broadcast). -> (low-res logits N x 4h x 4w, iou N).

    ``context`` (N x 4 ints, windows of any sizes): each prompt decoded on its own crop (see the module
    docstring: not the whole-tile result); its logits outside the crop are ``fill``; ``windows`` is ignored.

    ``windows`` (N x 4 ints: row0, col0, row1, col1 on the h x w grid, e.g. each prompt's box with a margin):
    the upscaling - two thirds of the decoder's FLOPs with 32 prompts - runs only inside each prompt's window,
    and the logits outside are ``fill``. Inside a window they are the full decoder's, exactly: the attention
    still sees the whole image; only mask pixels far from the prompt are not computed.
    """
    md = sam.mask_decoder
    tr = md.transformer
    n = sparse.shape[0]
    out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0).to(sparse.dtype)
    tokens = torch.cat([out_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)  # N, T, C
    h, w = emb.shape[-2:]
    if context is not None:
        return _decode_in_context(sam, tokens, emb[:1] + dense[:1], image_pe[:1], context, fill)
    src = (emb[:1] + dense[:1]).flatten(2).transpose(1, 2).contiguous()  # 1, L, C: the same for every prompt
    pe = image_pe[:1].flatten(2).transpose(1, 2).contiguous()  # 1, L, C

    queries, query_pe, keys = tokens, tokens, src
    for layer in tr.layers:
        queries = _token_self_attention(layer, queries, query_pe)

        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        kp = keys + pe
        if keys.shape[0] == 1:  # the image before any prompt touched it: its projections once for all prompts
            k_img, q_img = F.linear(kp[0], torch.cat([t2i.k_proj.weight, i2t.q_proj.weight]),
                                    torch.cat([t2i.k_proj.bias, i2t.q_proj.bias])).split(
                                        [t2i.internal_dim, i2t.internal_dim], dim=-1)
            v_img = t2i.v_proj(keys[0])
            queries = layer.norm2(queries + _t2i_shared(t2i, queries + query_pe, k_img.contiguous(), v_img))
            queries = layer.norm3(queries + layer.mlp(queries))
            keys = layer.norm4(keys + _i2t_shared(i2t, q_img.contiguous(), queries + query_pe, queries))
        else:
            queries = layer.norm2(queries + _t2i(t2i, queries + query_pe, kp, keys))
            queries = layer.norm3(queries + layer.mlp(queries))
            keys = layer.norm4(keys + _i2t(i2t, kp, queries + query_pe, queries))

    final = tr.final_attn_token_to_image
    queries = tr.norm_final_attn(queries + _t2i(final, queries + query_pe, keys + pe, keys))

    hyper = md.output_hypernetworks_mlps[0](queries[:, 1])  # N, C2: mask token 0 only
    if windows is None:
        low = _upscaled_mask(md, keys, hyper, (h, w))
    else:
        low = _upscaled_mask_windows(md, keys, hyper, (h, w), windows, fill)
    iou = md.iou_prediction_head(queries[:, 0])[:, 0]
    return low, iou


__all__ = ["supports", "decode_single_mask"]
