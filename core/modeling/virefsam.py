"""ViRefSAM = frozen SAM + VCP encoder + DTA adapters (Bi et al. 2025, arXiv 2507.02294).

Order of the passes for one target tile and a reference set of K shots. Costs: embedded TinyViT model, fp32,
1024x1024 input, on 2 CPU cores shared with other jobs (load average ~6; everything ~2x slower at ~9):

1. references -> frozen image encoder, once per reference set: K encoder passes (5.0 s each), then Eq. 1
   prototypes (:func:`.prototypes.build_prototypes`, 0.06 s for K = 1).
2. target -> frozen image encoder, the "plain" embedding (5.3 s). It does not depend on the class, so
   callers cache it per tile and reuse it across classes (``plain=``; ReferencePredictor's ``cache=``).
   From it: Eq. 2 prototype refinement (VCP, 0.06 s) and the Eq. 3 pseudo-mask + Eq. 6 assignment (0.04 s).
3. target -> adapted image encoder: the same frozen blocks plus a DTA adapter per block, driven by the
   refined prototypes and the assignment (5.4 s, ~1.0x a plain pass: the adapters are small). This second
   encoder pass per tile is the price of DTA. Several classes on one tile share it: one context holding every
   class's prototypes (:mod:`.joint_dta`).
4. VCP queries, Eq. 4, on the adapted embedding (0.04 s).
5. SAM's prompt encoder (points + box from the pseudo-mask, the pseudo-mask as ``mask_input``) + the 64 VCP
   queries as extra sparse tokens -> SAM's mask decoder, one decoder call per target (~0.2 s).
6. (inference, ``self_support``) the target's confident objects and background from 5. join the reference's
   prototypes (:mod:`.self_support`); 2 (Eqs. 2-3), 4 and 5 once more on the same adapted embedding.

Per tile with the plain embedding cached, passes 2-5 take 5.4 s; without the cache add one encoder pass.
(These are PyTorch times. For inference with the embedded model on the CPU, both encoder passes run in ONNX
Runtime, ~4x faster; pass 3 then starts from the tokens pass 2 computed before the first adapted block:
``adapted_runner``, :mod:`.ort_adapted`.)
(Training-free mode for comparison: one encoder pass + SAM's decoder once per prompt, 0.17 s for 1 prompt,
8.7 s for the cap of 32.)

Only ``vcp`` and ``encoder.adapters`` are trainable; ``sam`` stays frozen (``requires_grad`` False, kept in
eval mode even when the ViRefSAM module is put in train mode). No manual prompt reaches the decoder: every
point, box and mask prompt is derived from the reference prototypes.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..errors import ModelError
from .dta import AdaptedEncoder, DTAContext, check_signature
from .prototypes import GRID, Prototypes, build_prototypes, mask_to_grid, pseudo_mask
from .self_support import self_support_prototypes
from .vcp import VCPEncoder

ADAPTER_FORMAT = "virefsam-adapters"
ADAPTER_VERSION = 1


def prompts_from_pseudo_mask(
    mask: torch.Tensor, margin: torch.Tensor, valid: Optional[torch.Tensor] = None, img_size: int = 1024
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Point and box prompts derived from a pseudo-mask (batched, fixed shapes).

    mask, margin: B x h x w. Returns ``coords B x 2 x 2`` (input-frame pixels: the most foreground-like cell,
    a positive point, and the most background-like valid cell, a negative point), ``labels B x 2`` (1, 0),
    ``boxes B x 4`` (x0, y0, x1, y1 of the pseudo-mask's extent) and ``has_box B`` (False for an empty mask).
    """
    b, h, w = mask.shape
    cell = img_size / w
    flat = margin.flatten(1)
    if valid is None:
        valid = torch.ones_like(mask)
    vflat = valid.expand_as(mask).flatten(1).to(torch.bool)
    pos = flat.masked_fill(~vflat, float("-inf")).argmax(dim=1)
    neg = flat.masked_fill(~vflat, float("inf")).argmin(dim=1)
    idx = torch.stack([pos, neg], dim=1)  # B x 2
    ys, xs = (idx // w).float(), (idx % w).float()
    coords = torch.stack([(xs + 0.5) * cell - 0.5, (ys + 0.5) * cell - 0.5], dim=-1)  # SAM adds 0.5 itself
    labels = torch.tensor([1, 0], device=mask.device).expand(b, 2)
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # B x h, B x w
    ar_h = torch.arange(h, device=mask.device)
    ar_w = torch.arange(w, device=mask.device)
    y0 = torch.where(rows, ar_h, h).min(dim=1).values
    y1 = torch.where(rows, ar_h, -1).max(dim=1).values
    x0 = torch.where(cols, ar_w, w).min(dim=1).values
    x1 = torch.where(cols, ar_w, -1).max(dim=1).values
    has_box = rows.any(dim=1)
    boxes = torch.stack([x0 * cell, y0 * cell, (x1 + 1) * cell, (y1 + 1) * cell], dim=1).float()
    boxes = torch.where(has_box[:, None], boxes, torch.zeros_like(boxes))
    return coords, labels, boxes, has_box


def decode_per_image(sam, emb: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor, multimask=False):
    """SAM's mask decoder for B images with one prompt set each (the decoder broadcasts a batch-1 embedding
    over the prompts, so images go one at a time), or for S prompt sets on one image (emb of batch 1, sparse
    and dense of batch S: one call). -> (low-res logits B x K x 256 x 256, iou B x K)."""
    pe = sam.prompt_encoder.get_dense_pe()
    if emb.shape[0] == 1:
        return sam.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                dense_prompt_embeddings=dense, multimask_output=multimask)
    lows, ious = [], []
    for i in range(emb.shape[0]):
        low, iou = sam.mask_decoder(
            image_embeddings=emb[i : i + 1],
            image_pe=pe,
            sparse_prompt_embeddings=sparse[i : i + 1],
            dense_prompt_embeddings=dense[i : i + 1],
            multimask_output=multimask,
        )
        lows.append(low)
        ious.append(iou)
    return torch.cat(lows), torch.cat(ious)


class ViRefSAM(nn.Module):
    """Frozen SAM + trainable VCP encoder and DTA adapters.

    ``forward(target_x, protos, plain=None, valid=None)``:
      target_x  B x 3 x 1024 x 1024 (SAM-preprocessed targets)
      protos    :class:`Prototypes` of batch 1 (one reference set for all targets) or B (one per episode),
                from :meth:`reference_prototypes`
      plain     B x 256 x 64 x 64 frozen-encoder embedding of the targets (computed when None)
      valid     B x 64 x 64 bool, cells inside the image (padding excluded); None = all
      stem      B x 16384 x 128 stem tokens of the plain pass (SamEngine.encode_with_stem), used by
                ``adapted_runner`` only; None = computed by it
      shots     K > 1 :class:`Prototypes`, each reference's own (inference only): the K-shot ensemble
                (:meth:`shot_ensemble`); None = the joint prototypes alone
    returns a dict: ``low_res_logits`` B x 1 x 256 x 256, ``iou`` B x 1, ``l_reg`` (scalar), ``pseudo_mask``
    B x 64 x 64 bool, ``margin`` B x 64 x 64, ``mask_input`` B x 1 x 256 x 256, ``embedding`` B x 256 x 64 x 64
    (the adapted one; for :meth:`self_support`, which callers run after their own filtering of the mask).
    """

    def __init__(self, sam: nn.Module, n_queries: int = 64, n_bg: int = 5, dta_dim: int = 64, seed: int = 0):
        super().__init__()
        for p in sam.parameters():
            p.requires_grad_(False)
        sam.eval()
        self.sam = sam
        dim = int(sam.prompt_encoder.embed_dim)
        self.encoder = AdaptedEncoder(sam.image_encoder, proto_dim=dim, hidden=dta_dim)
        self.vcp = VCPEncoder(dim=dim, prompt_dim=dim, n_queries=n_queries)
        self.n_bg, self.seed = n_bg, seed
        self.config = {"n_queries": n_queries, "n_bg": n_bg, "dta_dim": dta_dim}
        # False: VCP alone (the ablation "VCP without DTA", adapters trained with ``train --no-dta``). The DTA
        # branches then add nothing, so the adapted pass would equal the plain embedding: it is skipped.
        self.use_dta = True
        # optional callable returning a context for the encoder passes (e.g. SamEngine.autocast for bf16/fp16);
        # everything else runs in the parameters' dtype, like SamEngine's decoder
        self.encoder_autocast = None
        # optional callable (x, DTAContext) -> embedding running the adapted pass outside PyTorch (ONNX Runtime,
        # SamEngine.adapted_encoder); used for inference only, never when gradients are needed
        self.adapted_runner = None
        self.decoder_runner = None  # ort_decoder.OrtMaskDecoder set by the predictor (inference only), or None

    # -- training plumbing ------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.sam.eval()  # frozen SAM: BatchNorm statistics and TinyViT's cached attention biases stay fixed
        return self

    def trainable_parameters(self) -> List[nn.Parameter]:
        return list(self.vcp.parameters()) + list(self.encoder.adapters.parameters())

    def adapter_state_dict(self) -> Dict[str, object]:
        return {
            "format": ADAPTER_FORMAT,
            "version": ADAPTER_VERSION,
            "signature": self.encoder.signature(),
            "config": dict(self.config),
            "vcp": {k: v.detach().cpu() for k, v in self.vcp.state_dict().items()},
            "dta": {k: v.detach().cpu() for k, v in self.encoder.adapters.state_dict().items()},
        }

    def save_adapters(self, path: Union[str, Path]) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.adapter_state_dict(), tmp)
        tmp.replace(path)

    @staticmethod
    def read_adapters(path: Union[str, Path, dict]) -> Dict[str, object]:
        if isinstance(path, dict):
            blob = path
        else:
            p = Path(path)
            if not p.is_file():
                raise ModelError(f"The adapter file {p} does not exist: choose a .pt file written by training.")
            try:
                blob = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to replace
                raise ModelError(f"The adapter file {p} cannot be read ({type(exc).__name__}); it is damaged.")
        if not isinstance(blob, dict) or blob.get("format") != ADAPTER_FORMAT:
            raise ModelError("This file holds no ViRefSAM adapters: choose a .pt file written by training.")
        if int(blob.get("version", 0)) > ADAPTER_VERSION:
            raise ModelError("These adapters were written by a newer version of the plugin: update the plugin.")
        return blob

    def load_adapters(self, path: Union[str, Path, dict]) -> "ViRefSAM":
        """Load adapter weights; refuse (ModelError) adapters made for another backbone or configuration."""
        blob = self.read_adapters(path)
        check_signature(blob["signature"], self.encoder.signature())
        if dict(blob["config"]) != self.config:
            raise ModelError(
                f"These adapters use another configuration ({blob['config']}, here {self.config}); "
                "build the model with ViRefSAM.from_adapters."
            )
        try:
            self.vcp.load_state_dict(blob["vcp"])
            self.encoder.adapters.load_state_dict(blob["dta"])
        except (RuntimeError, KeyError) as exc:
            raise ModelError(f"The adapter weights do not fit this model ({exc.__class__.__name__}).") from None
        return self

    @classmethod
    def from_adapters(cls, sam: nn.Module, path: Union[str, Path, dict], seed: int = 0) -> "ViRefSAM":
        blob = cls.read_adapters(path)
        cfg = dict(blob.get("config", {}))
        try:
            model = cls(sam, n_queries=int(cfg["n_queries"]), n_bg=int(cfg["n_bg"]), dta_dim=int(cfg["dta_dim"]),
                        seed=seed)
        except (KeyError, TypeError, ValueError):
            raise ModelError("The adapter file has no valid configuration: it is damaged.") from None
        model.load_adapters(blob)
        model.use_dta = bool(dict(blob.get("training") or {}).get("dta", True))
        return model

    # -- passes 1 and 2 ---------------------------------------------------------------------------------------
    def _encoder_context(self):
        return self.encoder_autocast() if callable(self.encoder_autocast) else nullcontext()

    @torch.no_grad()
    def encode_plain(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen encoder: B x 3 x 1024 x 1024 -> B x 256 x 64 x 64 (no gradient: SAM is frozen)."""
        with self._encoder_context():
            emb = self.sam.image_encoder(x)
        return emb.to(next(self.vcp.parameters()).dtype)

    def reference_prototypes(
        self, feats: torch.Tensor, masks: torch.Tensor, valid: Optional[torch.Tensor] = None
    ) -> Prototypes:
        """Eq. 1 over K shots. feats K x 256 x 64 x 64; masks K x 1024 x 1024 (or K x 64 x 64 coverage fractions)
        in the padded input frame; valid K x 64 x 64 bool (padding excluded) -> Prototypes of batch 1."""
        frac = masks.float() if masks.shape[-1] == feats.shape[-1] else mask_to_grid(masks, feats.shape[-1])
        if frac.dim() == 4:
            frac = frac[:, 0]
        return build_prototypes(feats, frac, valid, self.n_bg, self.seed)

    # -- passes 2-5 -------------------------------------------------------------------------------------------
    def forward(
        self,
        target_x: torch.Tensor,
        protos: Prototypes,
        plain: Optional[torch.Tensor] = None,
        valid: Optional[torch.Tensor] = None,
        stem: Optional[torch.Tensor] = None,
        shots: Optional[List[Prototypes]] = None,
    ) -> Dict[str, torch.Tensor]:
        b = target_x.shape[0]
        if plain is None:
            plain = self.encode_plain(target_x)
        protos = protos.expand(b).to(device=plain.device, dtype=plain.dtype)
        if valid is not None:
            valid = valid.to(device=plain.device, dtype=torch.bool).expand(b, -1, -1)
        pe = self.sam.prompt_encoder.get_dense_pe().to(plain.dtype)

        # pass 2 (cont.): Eq. 2 refinement, Eq. 3 pseudo-mask, Eq. 6 assignment
        table, refined = self.refine(protos, plain, pe, valid)
        pmask, margin, assign = pseudo_mask(plain, refined, valid)

        # pass 3: adapted encoder (Eq. 5); without DTA it would return the plain embedding exactly
        if self.use_dta:
            ctx = DTAContext(table, assign)
            runner = self.adapted_runner
            if runner is not None and not torch.is_grad_enabled():  # training: the adapters need gradients
                emb = runner(target_x, ctx, stem=stem)  # stem: the plain pass's shared work, or None
            else:
                with self._encoder_context():
                    emb = self.encoder(target_x, ctx)
            emb = emb.to(plain.dtype)
        else:
            emb = plain

        # passes 4-5 on the joint prototypes (with K shots at inference: and on each shot's, batched)
        if shots is not None and len(shots) > 1 and not torch.is_grad_enabled():
            out = self.shot_ensemble(refined, pmask, margin, shots, plain, emb, pe, valid)
        else:
            out = self._decode(refined.fg, pmask, margin, emb, pe, valid)
        out["embedding"] = emb  # the adapted embedding: self_support decodes on it again
        return out

    def refine(self, protos: Prototypes, plain: torch.Tensor, pe: torch.Tensor,
               valid: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Prototypes]:
        """Eq. 2: the prototypes refined against the target. protos of batch B (on plain's device and dtype);
        plain B x 256 x 64 x 64; pe 1 x 256 x 64 x 64; valid B x 64 x 64 bool or None -> (table B x P x 256, the
        same rows as :class:`Prototypes`)."""
        table = self.vcp.refine(protos.table(), plain, pe, valid)
        return table, Prototypes(table[:, 0], protos.fg_valid, table[:, 1:], protos.bg_valid)

    def shot_ensemble(self, refined: Prototypes, pmask: torch.Tensor, margin: torch.Tensor, shots: List[Prototypes],
                      plain: torch.Tensor, emb: torch.Tensor, pe: torch.Tensor,
                      valid: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """K-shot ensemble on one adapted embedding: each shot's own prototypes (1 fg + its N_b bg, as in 1-shot)
        refined on ``plain`` (Eq. 2), its pseudo-mask (Eq. 3), queries and decoding on ``emb`` (passes 4-5); the
        K probabilities averaged with the joint decoding's.

        refined, pmask, margin: the joint prototypes after Eq. 2 and their pseudo-mask (batch B); shots K
        :class:`Prototypes` of batch 1 or B; plain, emb B x 256 x 64 x 64; pe 1 x 256 x 64 x 64; valid B x 64 x 64
        bool or None -> :meth:`_decode`'s dict for the joint prototypes with ``low_res_logits`` B x 1 x 256 x 256
        the ensemble's. Per target the K + 1 prompt sets share the work on its image: the K shots' prototype
        tables are refined in one call (each row attends to the image alone), the image's keys and values for the
        queries are projected once and the mask decoder takes the K + 1 prompt sets in one call (the same numbers
        as decoding them one by one, to float rounding). Used by :meth:`forward` and by the shared adapted pass
        of several classes (:mod:`.joint_dta`)."""
        b = plain.shape[0]
        outs = []
        for i in range(b):
            one = slice(i, i + 1)
            vi = None if valid is None else valid[one]
            ps = [p.expand(b).to(device=plain.device, dtype=plain.dtype) for p in shots]
            ps = [Prototypes(p.fg[one], p.fg_valid[one], p.bg[one], p.bg_valid[one]) for p in ps]
            table = self.vcp.refine(torch.cat([p.table() for p in ps], dim=1), plain[one], pe, vi)
            fgs, pms, mgs = [refined.fg[one]], [pmask[one]], [margin[one]]
            for p, t in zip(ps, table.split([p.table().shape[1] for p in ps], dim=1)):
                pm, mg, _ = pseudo_mask(plain[one], Prototypes(t[:, 0], p.fg_valid, t[:, 1:], p.bg_valid), vi)
                fgs.append(t[:, 0])
                pms.append(pm)
                mgs.append(mg)
            out = self._decode(torch.cat(fgs), torch.cat(pms), torch.cat(mgs), emb[one], pe, vi)
            prob = torch.sigmoid(out["low_res_logits"][:, :1].float()).mean(0, keepdim=True).clamp(1e-6, 1 - 1e-6)
            out = {k: t[:1] if k != "l_reg" else t for k, t in out.items()}  # the joint prototypes' entries
            out["low_res_logits"] = torch.log(prob / (1 - prob)).to(emb.dtype)
            outs.append(out)
        return {k: torch.cat([o[k] for o in outs]) if k != "l_reg" else outs[0][k] for k in outs[0]}

    def self_support(self, low: torch.Tensor, protos: Prototypes, plain: torch.Tensor, emb: torch.Tensor,
                     valid: Optional[torch.Tensor], exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One more decoding with the target's own confident objects beside the reference
        (:func:`.self_support.self_support_prototypes`): Eq. 2 refinement, Eq. 3 pseudo-mask, queries and
        decoder on the same adapted embedding, whose logits replace the first decoding's.

        low B x M x 256 x 256 (the first decoding's logits, channel 0 used, after the caller's filtering: what an
        analyst marked "not this class" must not become the target's own foreground); protos the reference's
        :class:`Prototypes` of batch 1 or B; plain, emb (``forward``'s ``embedding``) B x 256 x 64 x 64; valid
        B x 64 x 64 bool or None; exclude B x 64 x 64 bool or None (cells never the target's own foreground)
        -> B x 1 x 256 x 256 logits. Inference only: the predictor and the shared adapted
        pass of several classes (:mod:`.joint_dta`) call it after :meth:`forward`."""
        b = plain.shape[0]
        protos = protos.expand(b).to(device=plain.device, dtype=plain.dtype)
        if valid is not None:
            valid = valid.to(device=plain.device, dtype=torch.bool).expand(b, -1, -1)
        pe = self.sam.prompt_encoder.get_dense_pe().to(plain.dtype)
        fused = self_support_prototypes(plain, low, protos, valid, self.n_bg, self.seed, exclude=exclude)
        _, r = self.refine(fused, plain, pe, valid)
        pm, mg, _ = pseudo_mask(plain, r, valid)
        return self._decode(r.fg, pm, mg, emb, pe, valid)["low_res_logits"][:, :1].to(low.dtype)

    def _decode(self, fg: torch.Tensor, pmask, margin, emb, pe, valid) -> Dict[str, torch.Tensor]:
        """Passes 4-5 for B targets: VCP queries (Eq. 4) on ``emb`` within ``pmask``, SAM's prompt encoder
        (prompts derived from the pseudo-mask) + the queries -> mask decoder. fg B x C (the refined foreground
        prototypes), pmask and margin B x 64 x 64, emb B x 256 x 64 x 64, valid B x 64 x 64 or None; or S prompt
        sets on one image: fg, pmask and margin of batch S with emb and valid of batch 1 (:meth:`shot_ensemble`)."""
        queries, l_reg = self.vcp.queries(fg, emb, pe, pmask, valid)

        # pass 5: SAM's prompt encoder (prompts derived from the pseudo-mask) + queries -> mask decoder
        penc = self.sam.prompt_encoder
        coords, labels, boxes, has_box = prompts_from_pseudo_mask(pmask, margin.detach(), valid)
        pts = penc._embed_points(coords.to(emb.dtype), labels, pad=False)
        box = penc._embed_boxes(boxes.to(emb.dtype))
        box = torch.where(has_box[:, None, None], box, penc.not_a_point_embed.weight.expand_as(box))
        mask_input = self.vcp.mask_logits(margin, size=4 * GRID)
        dense = penc._embed_masks(mask_input)
        sparse = torch.cat([pts, box, queries.to(emb.dtype)], dim=1)
        runner = self.decoder_runner
        if runner is not None and not torch.is_grad_enabled():  # ONNX Runtime (inference on the CPU in fp32)
            low, iou = runner(emb, sparse, dense)
        else:
            low, iou = decode_per_image(self.sam, emb, sparse, dense)
        return {
            "low_res_logits": low,
            "iou": iou,
            "l_reg": l_reg,
            "pseudo_mask": pmask,
            "margin": margin,
            "mask_input": mask_input,
        }
