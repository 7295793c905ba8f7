"""Visual Contextual Prompt (VCP) encoder, ViRefSAM Eqs. 2-4, and the query regulariser L_reg.

Shapes (B targets, C = 256, P = 1 + N_b prototypes, N_q = 64 queries, h = w = 64, HW = 4096):

* Eq. 2 :class:`PrototypeRefiner` - the prototypes (``B x P x C``, from the reference) attend to the TARGET's
  plain image embedding (``B x C x h x w`` + SAM's dense positional encoding on the keys; padding cells
  masked out). Pre-norm residual cross-attention + FFN whose output projections are zero-initialised, so
  before training the refined prototypes equal the reference prototypes (and the pseudo-mask equals the
  training-free one).
* Eq. 3 lives in :mod:`.prototypes` (pseudo-mask from the refined prototypes); :meth:`VCPEncoder.mask_logits`
  turns its decision value (fg similarity - best bg similarity, ``B x h x w``) into SAM's ``mask_input``
  (``B x 1 x 256 x 256`` logits) with a learnable scale.
* Eq. 4 :meth:`VCPEncoder.queries` - ``N_q`` learnable queries, each enriched by adding a projection of the
  refined foreground prototype, attend to the (DTA-adapted) target embedding restricted to the cells of the
  pseudo-mask (mask-constrained cross-attention; an image whose pseudo-mask is empty attends to all its valid
  cells instead), then to each other (self-attention), then an FFN. Projected to SAM's prompt width they are
  the sparse prompt embeddings ``B x N_q x 256``.
* L_reg (:func:`query_regularizer`) - mean squared off-diagonal entry of the Gram matrix of the L2-normalised
  queries: 0 for mutually orthogonal queries, 1 when all coincide.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class _FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, zero_out: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.GELU()
        if zero_out:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _tokens(feats: torch.Tensor) -> torch.Tensor:
    """B x C x h x w -> B x HW x C."""
    return feats.flatten(2).transpose(1, 2)


class PrototypeRefiner(nn.Module):
    """Eq. 2: prototypes B x P x C refined by cross-attention to the target embedding B x C x h x w."""

    def __init__(self, dim: int = 256, heads: int = 8, mlp_dim: int = 1024) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)
        self.ffn = _FFN(dim, mlp_dim, zero_out=True)

    def forward(
        self, protos: torch.Tensor, feats: torch.Tensor, pe: torch.Tensor, valid: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        mem = self.norm_kv(_tokens(feats))
        key = mem + _tokens(pe).expand_as(mem)
        pad = None if valid is None else ~valid.flatten(1).to(torch.bool)
        out, _ = self.attn(self.norm_q(protos), key, mem, key_padding_mask=pad, need_weights=False)
        x = protos + out
        return x + self.ffn(self.norm_ffn(x))


def query_regularizer(q: torch.Tensor) -> torch.Tensor:
    """L_reg for queries B x N x C: mean over the batch of the mean squared off-diagonal normalised inner product."""
    qn = F.normalize(q.float(), dim=-1)
    gram = qn @ qn.transpose(1, 2)  # B x N x N
    n = q.shape[1]
    if n < 2:
        return gram.new_zeros(())
    off = gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))
    return off.pow(2).sum(dim=(1, 2)).mean() / (n * (n - 1))


class VCPEncoder(nn.Module):
    """The trainable VCP parts: prototype refinement (Eq. 2), pseudo-mask logits, the query decoder (Eq. 4)."""

    def __init__(
        self, dim: int = 256, prompt_dim: int = 256, n_queries: int = 64, heads: int = 8, mlp_dim: int = 1024
    ) -> None:
        super().__init__()
        self.dim, self.n_queries, self.heads = dim, n_queries, heads
        self.refiner = PrototypeRefiner(dim, heads, mlp_dim)
        # orthogonal rows of norm sqrt(dim), the scale of a LayerNorm'd token: the queries start distinct
        # (untrained, on real embeddings, L_reg of the final queries is ~0.09; with unit rows the attention
        # outputs, common to all queries, dominate and it starts at ~0.96)
        self.query_embed = nn.Parameter(torch.empty(n_queries, dim))
        nn.init.orthogonal_(self.query_embed, gain=dim**0.5)
        # the fg prototype (SAM embeddings have token norms ~1.4) is normalised, then projected and added to
        # every query, at about half the queries' own scale
        self.fg_norm = nn.LayerNorm(dim)
        self.fg_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.fg_proj.weight, gain=0.5)
        nn.init.zeros_(self.fg_proj.bias)
        self.norm_mem = nn.LayerNorm(dim)
        self.norm_cross, self.norm_self, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = _FFN(dim, mlp_dim)
        self.norm_out = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, prompt_dim)
        # pseudo-mask decision value (a cosine-similarity difference, ~ +-0.1) -> SAM mask_input logits
        self.mask_scale = nn.Parameter(torch.tensor(40.0))

    def refine(self, table: torch.Tensor, feats: torch.Tensor, pe: torch.Tensor, valid=None) -> torch.Tensor:
        """Eq. 2 on a prototype table B x P x C."""
        return self.refiner(table, feats, pe, valid)

    def mask_logits(self, margin: torch.Tensor, size: int = 256) -> torch.Tensor:
        """Pseudo-mask decision value B x h x w -> SAM's mask_input B x 1 x size x size (logits)."""
        x = F.interpolate(margin[:, None], size=(size, size), mode="bilinear", align_corners=False)
        return x * self.mask_scale

    def queries(
        self,
        fg: torch.Tensor,
        feats: torch.Tensor,
        pe: torch.Tensor,
        mask: torch.Tensor,
        valid: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eq. 4. fg S x C (refined fg prototype), feats B x C x h x w (adapted target embedding), pe 1 x C x h x w,
        mask S x h x w bool (pseudo-mask), valid B x h x w bool -> (sparse prompts S x N_q x prompt_dim, L_reg).

        B = S (one prompt set per image) or B = 1 with S >= 1 prompt sets on that one image (the K-shot ensemble
        on one adapted embedding): the image's keys and values are then computed once for all sets."""
        s = fg.shape[0]
        q = self.query_embed[None].expand(s, -1, -1) + self.fg_proj(self.fg_norm(fg))[:, None]
        mem = self.norm_mem(_tokens(feats))
        key = mem + _tokens(pe).expand_as(mem)
        allowed = mask.flatten(1).to(torch.bool)
        ok = torch.ones_like(allowed) if valid is None else valid.flatten(1).to(torch.bool).expand_as(allowed)
        allowed = allowed & ok
        empty = ~allowed.any(dim=1, keepdim=True)
        allowed = torch.where(empty, ok, allowed)  # empty pseudo-mask: attend to every valid cell
        q = q + _cross_attention(self.cross_attn, self.norm_cross(q), key, mem, allowed)
        x = self.norm_self(q)
        out, _ = self.self_attn(x, x, x, need_weights=False)
        q = q + out
        q = q + self.ffn(self.norm_ffn(q))
        return self.out_proj(self.norm_out(q)), query_regularizer(q)


def _cross_attention(attn: nn.MultiheadAttention, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     allowed: torch.Tensor) -> torch.Tensor:
    """``attn(q, key, value)`` (its weights, the same math as ``nn.MultiheadAttention``) with each query row
    attending only to the cells ``allowed``: q S x N x C, key/value B x HW x C (B = S, or 1: one image's keys and
    values projected once and shared by the S query sets), allowed S x HW bool (at least one True per row)
    -> S x N x C."""
    s, n, c = q.shape
    h = attn.num_heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)

    def heads(x: torch.Tensor) -> torch.Tensor:  # B x L x C -> B x heads x L x C/heads
        return x.unflatten(-1, (h, c // h)).transpose(1, 2)

    qh = heads(F.linear(q, w_q, b_q))
    kh, vh = heads(F.linear(key, w_k, b_k)), heads(F.linear(value, w_v, b_v))
    if kh.shape[0] != s:
        kh, vh = kh.expand(s, -1, -1, -1), vh.expand(s, -1, -1, -1)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed[:, None, None, :])
    return attn.out_proj(out.transpose(1, 2).reshape(s, n, c))
