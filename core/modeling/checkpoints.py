"""Checkpoint files of Meta's SAM and of MobileSAM: recognise them, validate them, refuse clearly.

A file is recognised by its sha256 (:data:`KNOWN_CHECKPOINTS`); any other file is loaded as a plain state dict
(``torch.load(weights_only=True)``: no Python objects are unpickled) and checked tensor by tensor against the
architecture that was chosen. Whatever is wrong - a missing path, a text file, a truncated download, a zip that
is not a checkpoint, a ViT-L file chosen as ViT-B - ends as one :class:`~core.errors.ModelError` sentence that
says what the file is (when that can be told) and what to choose instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from ..errors import ModelError
from .architectures import DISPLAY_NAMES, MODEL_NAMES

# sha256 of the official files -> (model name, file name). Source: the values published with the checkpoints
# and recorded in micro-sam (computational-cell-analytics/micro-sam, micro_sam/util.py, _CHECKSUMS), which
# downloads them from dl.fbaipublicfiles.com/segment_anything and from ChaoningZhang/MobileSAM.
KNOWN_CHECKPOINTS: Dict[str, Tuple[str, str]] = {
    "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912": ("vit_b", "sam_vit_b_01ec64.pth"),
    "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622": ("vit_l", "sam_vit_l_0b3195.pth"),
    "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e": ("vit_h", "sam_vit_h_4b8939.pth"),
    "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f": ("vit_t", "mobile_sam.pt"),
}
OFFICIAL_FILE_NAMES = {fname: name for name, fname in KNOWN_CHECKPOINTS.values()}

# Tensors a checkpoint may carry that the model does not take from it: TinyViT's ImageNet classifier, and
# TinyViT's attention index tables / cached biases (the model computes them itself) if a file has them.
OPTIONAL_PREFIXES = ("image_encoder.head.", "image_encoder.norm_head.")
OPTIONAL_SUFFIXES = (".attention_bias_idxs", ".attn.ab")

# Image encoder width -> model, for telling what a file is.
_VIT_WIDTHS = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
_VIT_DEPTHS = {12: "vit_b", 24: "vit_l", 32: "vit_h"}


def sha256_file(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def expected_shapes(name: str) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the state dict of ``name``'s architecture (built on the meta device where possible)."""
    import torch

    from .architectures import build_architecture

    if name in ("embedded", "vit_t"):  # TinyViT calls .item() while building: small enough to build on CPU
        sam = build_architecture(name)
    else:
        with torch.device("meta"):
            sam = build_architecture(name)
    return {k: tuple(v.shape) for k, v in sam.state_dict().items()}


def guess_model(state_dict: Dict[str, object]) -> Optional[str]:
    """What a state dict looks like: a model name, ``"sam2"``, or None when it cannot be told."""
    keys = list(state_dict)
    if any(k.startswith(("image_encoder.trunk.", "sam_mask_decoder.", "sam_prompt_encoder.")) for k in keys):
        return "sam2"
    if "image_encoder.patch_embed.seq.0.c.weight" in state_dict:
        return "vit_t"
    w = state_dict.get("image_encoder.patch_embed.proj.weight")
    if w is not None and getattr(w, "ndim", 0) == 4:
        return _VIT_WIDTHS.get(int(w.shape[0]))
    blocks = {int(m.group(1)) for k in keys for m in [re.match(r"image_encoder\.blocks\.(\d+)\.", k)] if m}
    if blocks:
        return _VIT_DEPTHS.get(max(blocks) + 1)
    return None


def _describe(name: str) -> str:
    return DISPLAY_NAMES.get(name, name)


def read_state_dict(path: Union[str, Path]) -> Dict[str, object]:
    """``torch.load(path, weights_only=True)`` as a flat ``{name: tensor}``, or one ModelError sentence."""
    import pickle

    import torch

    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"The checkpoint file {p} does not exist: check the path.")
    if p.is_dir():
        raise ModelError(f"{p} is a folder, not a checkpoint file: choose the .pth/.pt file inside it.")
    try:
        size = p.stat().st_size
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise ModelError(f"The checkpoint file {p} cannot be read ({exc.strerror or exc}).") from None
    if size == 0:
        raise ModelError(f"The checkpoint file {p} is empty: download it again.")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():  # a pickled class or function, not just tensors
            raise ModelError(
                f"{p} contains Python objects besides tensors, so it is not loaded (for safety only plain "
                "state dicts are accepted)."
            ) from None
        raise ModelError(_unreadable(p)) from None
    except Exception:  # truncated zip, text, random bytes, a zip of something else, ...
        raise ModelError(_unreadable(p)) from None
    return _flatten(obj, p)


def _unreadable(p: Path) -> str:
    if p.name in OFFICIAL_FILE_NAMES:
        return (
            f"{p} has the name of an official checkpoint but cannot be read: the download is probably incomplete, "
            "download it again."
        )
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except Exception:
            names = []
        if not any(n.endswith("data.pkl") for n in names):
            return f"{p} is a zip archive but not a PyTorch checkpoint: choose the .pth/.pt file itself."
    return f"{p} is not a readable PyTorch checkpoint (it may be truncated or another kind of file)."


def _flatten(obj, p: Path) -> Dict[str, object]:
    import torch

    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):  # {"model": state_dict} as some training scripts save
            inner = obj.get(wrapper)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise ModelError(f"{p} does not hold a state dict of named tensors, so it is not a SAM checkpoint.")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError(f"{p} holds no tensors, so it is not a SAM checkpoint.")
    return tensors


def check_state_dict(state_dict: Dict[str, object], name: str, path: Union[str, Path] = "the file"):
    """The state dict restricted to what ``name``'s architecture holds (float32), or one ModelError sentence."""
    import torch

    if name not in MODEL_NAMES:
        raise ModelError(f"Unknown model '{name}': choose one of {', '.join(MODEL_NAMES)}.")
    arch = "vit_t" if name == "embedded" else name
    guess = guess_model(state_dict)
    if guess == "sam2":
        raise ModelError(
            f"{path} looks like a SAM 2 checkpoint, which this plugin cannot use: choose a SAM (vit_b/l/h) or "
            "MobileSAM (vit_t) checkpoint."
        )
    if guess is not None and guess != arch:
        raise ModelError(
            f"{path} looks like a {_describe(guess)} checkpoint, not {_describe(name)}: choose the model "
            f"'{guess}' for it, or a {name} checkpoint."
        )
    want = expected_shapes(name)
    missing = [k for k in want if k not in state_dict]
    wrong = [k for k in want if k in state_dict and tuple(state_dict[k].shape) != want[k]]
    extra = [
        k for k in state_dict if k not in want and not k.startswith(OPTIONAL_PREFIXES) and not k.endswith(OPTIONAL_SUFFIXES)
    ]
    if len(missing) == len(want):
        raise ModelError(f"{path} is not a {_describe(name)} checkpoint: none of its tensors has the model's names.")
    if missing or wrong or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors are missing (e.g. {missing[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} have other shapes (e.g. {k} {tuple(state_dict[k].shape)}, expected {want[k]})")
        if extra:
            parts.append(f"{len(extra)} are unknown (e.g. {extra[0]})")
        raise ModelError(f"{path} does not fit {_describe(name)}: " + ", ".join(parts) + ".")
    out = {}
    for k in want:
        t = state_dict[k]
        out[k] = t.float() if t.is_floating_point() and t.dtype != torch.float32 else t
    return out


def identify(path: Union[str, Path]) -> Optional[Tuple[str, str]]:
    """``(model name, official file name)`` when the file is a known official checkpoint, else None."""
    return KNOWN_CHECKPOINTS.get(sha256_file(path))


def load_checkpoint(path: Union[str, Path], name: str) -> Dict[str, object]:
    """The validated state dict of the checkpoint file ``path`` for the model ``name`` (``vit_t/b/l/h``)."""
    p = Path(os.fspath(path)).expanduser()
    if p.is_file():
        try:
            known = identify(p)
        except OSError as exc:
            raise ModelError(f"The checkpoint file {p} cannot be read ({exc.strerror or exc}).") from None
        if known is not None and known[0] != name:
            raise ModelError(
                f"{p} is the official {_describe(known[0])} checkpoint ({known[1]}), not {_describe(name)}: "
                f"choose the model '{known[0]}' for it."
            )
    return check_state_dict(read_state_dict(p), name, p)
