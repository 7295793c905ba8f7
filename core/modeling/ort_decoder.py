"""ONNX Runtime backend for SAM's mask decoder as ViRefSAM calls it (CPU, fp32).

ViRefSAM decodes each tile with one prompt set per shot (joint prototypes, each reference, the zoomed views: four
calls per tile by default): SAM's ``MaskDecoder`` on the adapted embedding with the pseudo-mask's point and box
prompts and the VCP queries as sparse tokens and the pseudo-mask's logits as the dense prompt, single-mask
output (:func:`.virefsam.decode_per_image`). That call is exported once per decoder to an ONNX graph and run by
ONNX Runtime, as the encoder passes are: about 1.6x faster than PyTorch on this project's 2-core CPU
(0.044-0.055 s against 0.073-0.095 s a call), the same logits within ~1e-5.

    graph inputs:  emb    1 x 256 x 64 x 64 float32   (the tile's adapted embedding)
                   sparse S x N x 256 float32         (S prompt sets: points, box and queries, N = 68 with N_q = 64)
                   dense  S x 256 x 64 x 64 float32   (the prompt encoder's embedding of each set's mask input)
    graph outputs: low    S x 1 x 256 x 256 float32   (low-res mask logits, mask token 0)
                   iou    S x 1 float32
    SAM's dense positional encoding (``prompt_encoder.get_dense_pe()``) is a constant of the graph.

    runner = OrtMaskDecoder(sam, threads=2)            # export (or cached graph) + ORT session
    low, iou = runner(emb, sparse, dense)              # B images, one prompt set each (one session run each),
                                                       # or S prompt sets on one image (one run: the K-shot ensemble)

Cache: ``cache_dir()/decoder/<key>.onnx``, written by the project on first use (``setup-model`` makes the embedded
model's ahead of time), never shipped. ``key`` is a sha256 over the decoder's tensors and the positional
encoding (names, shapes, bytes) plus the export's settings; the file is written under a temporary name and renamed
into place, and a graph ONNX Runtime cannot load is exported again, once (as :mod:`.ort_adapted`).

Only inference goes through ORT: gradients (training, run-time tuning) run the PyTorch module, and so does every
call on CUDA or in bf16/fp16 (:meth:`core.modeling.engine.SamEngine.mask_decoder_runner` decides).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import ModelError
from .ort_adapted import OPSET, atomic_export, cpu_session, open_cached

EXPORT_VERSION = 2  # bump when the exported graph changes for the same weights (2: S prompt sets per image)
N_SPARSE = 68  # the example the graph is traced with (the token count stays dynamic)


def decoder_dir() -> Path:
    from ..paths import cache_dir

    return cache_dir() / "decoder"


def graph_key(sam: nn.Module) -> str:
    """sha256 over the mask decoder's tensors and the dense positional encoding (name, shape, dtype, bytes) and
    the export's settings: the same weights give the same key, any changed tensor another one."""
    h = hashlib.sha256(f"virefsam-decoder-onnx:{EXPORT_VERSION}:{OPSET}".encode())
    with torch.no_grad():
        pe = sam.prompt_encoder.get_dense_pe()
    tensors = sorted(sam.mask_decoder.state_dict().items()) + [("dense_pe", pe)]
    for name, t in tensors:
        a = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(a.shape)}:{a.dtype}".encode())
        h.update(memoryview(a.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def graph_path(key: str) -> Path:
    return decoder_dir() / f"mask_decoder_{key[:32]}.onnx"


class _Decode(nn.Module):
    """SAM's mask decoder, one prompt set on one image, single-mask output (what the ONNX exporter traces)."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.mask_decoder = sam.mask_decoder
        with torch.no_grad():
            self.register_buffer("pe", sam.prompt_encoder.get_dense_pe().detach().clone())

    def forward(self, emb: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor):
        return self.mask_decoder(image_embeddings=emb, image_pe=self.pe, sparse_prompt_embeddings=sparse,
                                 dense_prompt_embeddings=dense, multimask_output=False)


def export(sam: nn.Module, path: Path) -> Path:
    """Trace the decoder call to ``path`` (written atomically)."""
    p = next(sam.mask_decoder.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        raise ModelError("The mask decoder is exported from float32 weights on the CPU only.")
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _Decode(sam).eval()
    dim = int(module.pe.shape[1])
    grid = tuple(module.pe.shape[-2:])
    # traced with two prompt sets on one image, so that the set count stays an input of the graph
    args = (torch.zeros(1, dim, *grid), torch.zeros(2, N_SPARSE, dim), torch.zeros(2, dim, *grid))
    dynamic = {"sparse": {0: "S", 1: "N"}, "dense": {0: "S"}, "low": {0: "S"}, "iou": {0: "S"}}
    atomic_export(module, args, path, ["emb", "sparse", "dense"], ["low", "iou"], dynamic)
    return path


class OrtMaskDecoder:
    """The exported decoder call in an ONNX Runtime CPU session; ``__call__(emb, sparse, dense)`` as
    :func:`.virefsam.decode_per_image` (B images, one prompt set each) -> (low B x 1 x 256 x 256, iou B x 1).
    ``exported``: whether this instance wrote the graph (False: read from the cache); ``rebuilt``: whether a
    damaged cached graph was replaced."""

    def __init__(self, sam: nn.Module, threads: int = 0, spinning: bool = False, key: Optional[str] = None) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ModelError("onnxruntime is not installed: the mask decoder runs in PyTorch.") from None
        self.key = key or graph_key(sam)
        self.path = graph_path(self.key)
        self.threads = max(0, int(threads or 0))

        def build(missing_only: bool) -> bool:
            if missing_only and self.path.is_file():
                return False
            export(sam, self.path)
            return True

        def open_() -> None:
            self.session = cpu_session(self.path, self.threads, spinning)

        self.exported, self.rebuilt = open_cached(build, open_, f"mask decoder {self.path.name}")

    def __call__(self, emb: torch.Tensor, sparse: torch.Tensor,
                 dense: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        def arr(t: torch.Tensor, i) -> np.ndarray:  # i: an index (that image alone) or a slice
            part = t[i if isinstance(i, slice) else slice(i, i + 1)]
            return part.detach().to("cpu", torch.float32).contiguous().numpy()

        if emb.shape[0] == 1:  # S prompt sets on one image: one run (the graph repeats the image per set)
            low, iou = self.session.run(None, {"emb": arr(emb, 0), "sparse": arr(sparse, slice(None)),
                                               "dense": arr(dense, slice(None))})
            return torch.from_numpy(low).to(emb.device), torch.from_numpy(iou).to(emb.device)
        lows, ious = [], []
        for i in range(emb.shape[0]):
            low, iou = self.session.run(None, {"emb": arr(emb, i), "sparse": arr(sparse, i), "dense": arr(dense, i)})
            lows.append(low)
            ious.append(iou)
        low = torch.from_numpy(np.concatenate(lows) if len(lows) > 1 else lows[0])
        iou = torch.from_numpy(np.concatenate(ious) if len(ious) > 1 else ious[0])
        return low.to(emb.device), iou.to(emb.device)


def runnable(sam: nn.Module) -> bool:
    """Whether this SAM's decoder can be exported here: fp32 weights on the CPU, onnx + onnxruntime installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    p = next(sam.mask_decoder.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32


__all__ = ["OrtMaskDecoder", "decoder_dir", "export", "graph_key", "graph_path", "runnable"]
