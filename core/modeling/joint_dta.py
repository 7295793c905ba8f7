"""Several classes, one adapted encoder pass per tile (ViRefSAM's pass 3 shared between classes).

ViRefSAM's adapted (DTA) pass depends on the class only through its context: a prototype table and a per-cell
assignment into it (Eq. 6). The DTA adapter uses ``proto_proj(table)[assign]`` and nothing else, so it does
not care which row is which: one table holding the rows of every class serves all classes at once.

Joint context for C classes on one tile (each class's passes 2 as in :meth:`.virefsam.ViRefSAM.forward`)::

    table_k   1 x (1 + N_b,k) x 256   class k's refined prototypes (Eq. 2): fg, then its background rows
    table     1 x P x 256             table_1 .. table_C side by side (P = sum of 1 + N_b,k)
    assign    1 x 64 x 64 in [0, P]   a cell inside some class's pseudo-mask (Eq. 3): the fg row of the class
                                      with the largest margin there; any other valid cell: the background row
                                      (of any class) most similar to it; padding: P ("no prototype")

then ONE adapted pass (the engine's ONNX Runtime runner where there is one: the table's row count is a dynamic
axis of its graph) and, per class, the VCP queries (Eq. 4) and the decoder on that embedding. A class with the
K-shot ensemble (``ReferencePredictor._shots``) then decodes each of its shots on the same embedding and averages
with that class's joint decoding (:meth:`.virefsam.ViRefSAM.shot_ensemble`, as in the class's own pass), and a
class with self-support decodes once more (:meth:`.virefsam.ViRefSAM.self_support`). With one
class the joint context is exactly the class's own (same table, same assignment), but one-class runs never come
here.

    probs = predict_classes(predictors, tile)    # C x H x W float32, one ReferencePredictor per class

:func:`shared_pass_applies` says when the predictors can share the pass (all trained ViRefSAM with DTA on the
same model); the pipeline falls back to one pass per class otherwise.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from .dta import DTAContext
from .prototypes import Prototypes, pseudo_mask, similarity_maps


def shared_pass_applies(predictors: Sequence) -> bool:
    """Whether one adapted pass can serve every predictor: at least two, all in ``virefsam`` mode with DTA on
    the same model, references set (a K-shot ensemble's shots are decoded on the shared embedding too)."""
    if len(predictors) < 2:
        return False
    model = predictors[0].model
    return model is not None and model.use_dta and all(
        p.mode == "virefsam" and p.model is model and p._protos is not None for p in predictors
    )


def joint_context(plain: torch.Tensor, refined: Sequence[Prototypes], tables: Sequence[torch.Tensor],
                  valid: torch.Tensor) -> Tuple[DTAContext, List[Tuple[torch.Tensor, torch.Tensor]]]:
    """The joint DTA context of C classes (see the module doc) and each class's (pseudo-mask, margin).

    plain B x 256 x 64 x 64; refined[k] Prototypes of batch B; tables[k] B x (1 + N_b,k) x 256 (refined[k]'s
    table); valid B x 64 x 64 bool -> ``(DTAContext(table B x P x 256, assign B x 64 x 64), [(pmask, margin)])``.
    """
    offsets, masks, margins, bg_sims, bg_rows = [], [], [], [], []
    off = 0
    for r, table in zip(refined, tables):
        pm, mg, _ = pseudo_mask(plain, r, valid)
        _, bg = similarity_maps(plain, r)  # B x N_b x h x w, -inf for invalid rows
        masks.append(pm)
        margins.append(mg)
        offsets.append(off)
        bg_sims.append(bg)
        bg_rows.extend(off + 1 + i for i in range(bg.shape[1]))
        off += table.shape[1]
    p = off
    b, h, w = masks[0].shape
    dev = plain.device
    # foreground: the class with the largest margin among those whose pseudo-mask holds the cell
    marg = torch.stack([torch.where(m, g, torch.full_like(g, float("-inf"))) for m, g in zip(masks, margins)])
    best_cls = marg.argmax(dim=0)  # B x h x w
    any_fg = torch.stack(masks).any(dim=0)
    fg_row = torch.tensor(offsets, device=dev)[best_cls]
    # elsewhere: the most similar valid background row of any class ("no prototype" where there is none)
    if bg_rows:
        bg = torch.cat(bg_sims, dim=1)
        best = bg.max(dim=1)
        rows = torch.tensor(bg_rows, device=dev)[best.indices]
        bg_row = torch.where(torch.isinf(best.values), torch.full_like(rows, p), rows)
    else:
        bg_row = torch.full((b, h, w), p, dtype=torch.long, device=dev)
    assign = torch.where(any_fg, fg_row, bg_row)
    if valid is not None:
        assign = torch.where(valid.to(torch.bool).expand_as(assign), assign, torch.full_like(assign, p))
    return DTAContext(torch.cat(list(tables), dim=1), assign), list(zip(masks, margins))


@torch.inference_mode()
def predict_classes(predictors: Sequence, image: np.ndarray) -> np.ndarray:
    """C x H x W float32 probabilities of a tile for the C predictors' classes, with one plain and one adapted
    encoder pass (:func:`shared_pass_applies` must hold)."""
    from .tile_encoding import _check_image

    image = _check_image(image, "target tile")
    first = predictors[0]
    model, engine = first.model, first.engine
    ts = [p._encode([image])[0] for p in predictors]  # the first encodes, the others find it in the shared cache
    t = ts[0]
    plain = t.plain
    valid = t.valid.to(device=plain.device, dtype=torch.bool)
    pe = model.sam.prompt_encoder.get_dense_pe().to(plain.dtype)
    refined, tables = [], []
    for p in predictors:  # pass 2 (cont.) per class: Eq. 2 refinement
        protos = p._protos.expand(1).to(device=plain.device, dtype=plain.dtype)
        table, r = model.refine(protos, plain, pe, valid)
        refined.append(r)
        tables.append(table)
    ctx, per_class = joint_context(plain, refined, tables, valid)
    # pass 3, once for all classes
    runner = model.adapted_runner
    if runner is not None:
        emb = runner(t.x, ctx, stem=t.stem)
    else:
        with model._encoder_context():
            emb = model.encoder(t.x, ctx)
    emb = emb.to(plain.dtype)
    out = []
    for p, r, (pm, mg) in zip(predictors, refined, per_class):  # passes 4-5 per class
        if p._shots is not None and len(p._shots) > 1:  # the K-shot ensemble, as ViRefSAM.forward
            low = model.shot_ensemble(r, pm, mg, p._shots, plain, emb, pe, valid)["low_res_logits"]
        else:
            low = model._decode(r.fg, pm, mg, emb, pe, valid)["low_res_logits"]
        low = p._with_self_support(t, low[:, :1], emb)  # negatives, then self-support, as the class's own pass
        logits = engine.postprocess(low.float(), t.input_size, t.original_size)
        out.append(torch.sigmoid(logits[0, 0].float()).cpu().numpy().astype(np.float32))
    return np.stack(out)


__all__ = ["shared_pass_applies", "joint_context", "predict_classes"]
