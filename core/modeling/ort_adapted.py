"""ONNX Runtime backend for ViRefSAM's adapted encoder pass (TinyViT + DTA adapters, CPU, fp32).

The adapted pass (:class:`.dta.AdaptedEncoder`) is exported once per (frozen encoder, adapters) pair to an ONNX
graph whose inputs are the SAM-preprocessed image and the DTA context, and run by ONNX Runtime like the plain
pass (:mod:`.ort_encoder`): ~4x faster than PyTorch fp32 on CPUs, the same embedding within ~1e-6.

    graph inputs:  tokens 1 x 16384 x 128 float32      (the stem: TinyViT's patch embedding + layers[0], the
                                                          same in both passes: the plain pass hands it over)
                   table  1 x P x 256 float32           (refined prototypes: fg, bg_1..bg_Nb; P = 1 + N_b)
                   assign 1 x 64 x 64 int64 in [0, P]   (Eq. 6 assignment; P = "no prototype")
    graph output:  emb    1 x 256 x 64 x 64 float32

    runner = OrtAdaptedEncoder(model.encoder, threads=2)  # export (or cached graph) + ORT session
    emb = runner(x, DTAContext(table, assign), stem=None)  # B x 3 x 1024 x 1024 -> B x 256 x 64 x 64
    (a second graph, ``<name>.stem.onnx``, computes the stem's tokens when the plain pass did not hand them over)

Cache: the graph is written by the project on first use (``python -m core setup-model`` makes the one of the
shipped adapters ahead of time), never shipped: ``cache_dir()/adapted/<kind>_<key>.onnx`` beside the converted
weights. ``key`` is a sha256 over the weights that go into the graph (the frozen encoder's and the DTA
adapters', names, shapes and bytes) plus the export's settings, so a user's own or retrained adapters file, or
another backbone, gets its own graph. The file is written under a temporary name and renamed into place (a
concurrent process never reads half a graph); a graph that ONNX Runtime cannot load is deleted and exported
again, once.

int8 (the default, ``precision="int8"``): a copy of the exported graph with its MatMul/Gemm weights quantised
to int8 per output channel and activations quantised on the fly (ONNX Runtime's dynamic quantisation), written
beside it as ``<kind>_<key>.int8v<QUANT_VERSION>.onnx`` and derived from it the same way (atomic, rebuilt when
damaged). On this project's AVX512-VNNI CPU it runs the adapted pass in about two thirds of the fp32 graph's
time; masks on real tiles agree with PyTorch fp32 at IoU >= 0.99 (tests/test_ort_adapted.py, and the bench states
it). The plain pass stays fp32: the plain embedding feeds the prototypes and pseudo-mask of every later step, and a
pseudo-mask cell that flips takes a whole object with it. Quantised the same way, its masks moved more (IoU 0.98
on a Kampala tile); with only layers 1-2 in int8 (17-21% off the plain pass) and even with layer 1 alone, the
demo's Kampala target lost an object (IoU 0.935 against the fp32 plain pass); layer 1's MLPs alone kept it
(0.992) for 6% of the pass (docs/BENCH.md). Convolutions in uint8 (ConvInteger) took 10% off this graph but
masks fell to 0.986 pooled.

Only inference goes through ORT: an input that requires grad (training) runs the PyTorch module, and so does
every pass on CUDA or in bf16/fp16 (:meth:`core.modeling.engine.SamEngine.adapted_encoder` decides).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import ModelError
from .dta import AdaptedEncoder, DTAContext

OPSET = 17  # LayerNormalization is an ONNX op from 17; onnxruntime >= 1.14 runs it
EXPORT_VERSION = 1  # bump when the exported graph changes for the same weights
QUANT_VERSION = 1  # bump when the int8 quantisation's settings change
PRECISIONS = ("int8", "fp32")
GRID = 64
_LOCK = threading.Lock()


def adapted_dir() -> Path:
    from ..paths import cache_dir

    return cache_dir() / "adapted"


def graph_key(encoder: AdaptedEncoder) -> str:
    """sha256 over the frozen encoder's and the adapters' tensors (name, shape, dtype, bytes) and the export's
    settings: the same weights give the same key, any changed tensor another one (~20 ms for TinyViT)."""
    h = hashlib.sha256(f"virefsam-adapted-onnx:{EXPORT_VERSION}:{OPSET}:{encoder.kind}".encode())
    for prefix, module in (("encoder", encoder.encoder), ("dta", encoder.adapters)):
        for name, t in sorted(module.state_dict().items()):
            a = t.detach().to("cpu").contiguous()
            h.update(f"{prefix}.{name}:{tuple(a.shape)}:{a.dtype}".encode())
            h.update(memoryview(a.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def graph_path(encoder: AdaptedEncoder, key: Optional[str] = None) -> Path:
    return adapted_dir() / f"{encoder.kind}_{(key or graph_key(encoder))[:32]}.onnx"


class _FromStem(nn.Module):
    """AdaptedEncoder after its stem, the DTA context as separate tensors (what the ONNX exporter traces)."""

    def __init__(self, encoder: AdaptedEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, tokens: torch.Tensor, table: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_from_stem(tokens, DTAContext(table, assign))


class _Stem(nn.Module):
    def __init__(self, encoder: AdaptedEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.stem(x)


def atomic_export(module: nn.Module, args, path: Path, names, outputs, dynamic=None) -> None:
    """Trace ``module`` on ``args`` to the ONNX graph ``path`` (opset :data:`OPSET`), written under a temporary
    name and renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".part", dir=str(path.parent))
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, tmp, input_names=names, output_names=outputs, opset_version=OPSET,
                              dynamo=False, do_constant_folding=True, dynamic_axes=dynamic)
        os.replace(tmp, path)  # a concurrent reader sees the old file, none, or the whole new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def stem_path(path: Path) -> Path:
    return path.with_name(path.stem + ".stem.onnx")


def int8_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.int8v{QUANT_VERSION}.onnx")


def quantize(path: Path) -> Path:
    """Write :func:`int8_path` of the exported fp32 graph ``path``: ONNX Runtime's dynamic quantisation of its
    MatMul and Gemm nodes (int8 weights per output channel, activations quantised per run), atomically."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = int8_path(path)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".part.onnx", dir=str(out.parent))
    os.close(fd)
    level = logging.root.manager.disable
    try:
        logging.disable(logging.WARNING)  # quantize_dynamic advises pre-processing on the root logger
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(path), tmp, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"])
        os.replace(tmp, out)
    finally:
        logging.disable(level)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def export(encoder: AdaptedEncoder, path: Path, n_table: int = 6) -> Path:
    """Trace ``encoder`` to ``path`` (the adapted blocks from the stem's tokens on) and :func:`stem_path` (the
    stem, for tiles whose plain pass did not hand its tokens over), each written atomically (temp + rename)."""
    if int(getattr(encoder.encoder, "img_size", 1024)) != 1024:
        raise ModelError("The ONNX adapted encoder expects 1024x1024 inputs.")
    p = next(encoder.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        raise ModelError("The adapted encoder is exported from float32 weights on the CPU only.")
    x = torch.zeros(1, 3, 1024, 1024)
    table = torch.zeros(1, n_table, encoder.proto_dim)
    assign = torch.zeros(1, GRID, GRID, dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = encoder.training
    try:
        encoder.eval()
        with torch.no_grad():
            tokens = encoder.stem(x)
        atomic_export(_Stem(encoder), (x,), stem_path(path), ["x"], ["tokens"])
        atomic_export(_FromStem(encoder), (tokens, table, assign), path, ["tokens", "table", "assign"], ["emb"],
                       {"table": {1: "P"}})
    finally:
        encoder.train(was_training)
    return path


def open_cached(build: Callable[[bool], bool], open_: Callable[[], None], what: str) -> Tuple[bool, bool]:
    """Open an exported graph from the cache: ``build(missing_only=True)`` writes what is missing (and says whether
    it wrote), ``open_()`` opens the sessions; a cached graph ONNX Runtime cannot load (truncated, half-copied) is
    written again (``build(False)``), once. -> (exported, rebuilt). One sentence (ModelError) when a fresh export
    cannot be loaded either. One export at a time in this process; other processes are kept apart by the atomic
    renames."""
    with _LOCK:
        exported = build(True)
        try:
            open_()
            return exported, False
        except Exception:  # noqa: BLE001 - a damaged cached graph: export it again
            if exported:
                raise ModelError(f"ONNX Runtime cannot load the exported {what}.") from None
        build(False)
        try:
            open_()
        except Exception:  # noqa: BLE001
            raise ModelError(f"ONNX Runtime cannot load the exported {what}.") from None
        return True, True


def cpu_session(path: Path, threads: int, spinning: bool):
    """An ONNX Runtime CPU session of ``path`` with the encoder graphs' options
    (:func:`.ort_encoder.session_options`)."""
    import onnxruntime as ort

    from .ort_encoder import session_options

    return ort.InferenceSession(str(path), session_options(threads, spinning), providers=["CPUExecutionProvider"])


class OrtAdaptedEncoder:
    """The exported adapted encoder in ONNX Runtime CPU sessions; ``__call__(x, ctx, stem=None)`` as the module's
    forward. ``stem`` (1 x 16384 x 128 tokens, what the plain pass computed before its first adapted block:
    :meth:`core.modeling.engine.SamEngine.encode_with_stem`) skips that shared work; without it the stem graph
    runs first.

    ``precision``: ``int8`` (the default: :func:`quantize`'s graph) or ``fp32`` (the exported graph as it is).
    ``exported``: whether this instance wrote the graphs (False: read from the cache); ``rebuilt``: whether a
    damaged cached graph was replaced; ``run_path``: the graph the session runs.
    """

    def __init__(self, encoder: AdaptedEncoder, threads: int = 0, spinning: bool = False,
                 key: Optional[str] = None, n_table: int = 6, precision: str = "int8") -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ModelError("onnxruntime is not installed: the adapted encoder runs in PyTorch.") from None
        if precision not in PRECISIONS:
            raise ModelError(f"Unknown adapted-pass precision '{precision}': choose one of {', '.join(PRECISIONS)}.")
        self.key = key or graph_key(encoder)
        self.path = graph_path(encoder, self.key)
        self.precision = precision
        self.run_path = int8_path(self.path) if precision == "int8" else self.path
        self.threads = max(0, int(threads or 0))
        self.exported, self.rebuilt = open_cached(lambda missing_only: self._build(encoder, n_table, missing_only),
                                                  lambda: self._open(spinning),
                                                  f"adapted encoder {self.run_path.name}")

    def _build(self, encoder: AdaptedEncoder, n_table: int, missing_only: bool) -> bool:
        """Export (and quantise) what is missing, or, ``missing_only=False``, everything again; whether it wrote."""
        wrote = False
        if not missing_only:
            for p in (self.path, stem_path(self.path), int8_path(self.path)):
                p.unlink(missing_ok=True)
        if not (self.path.is_file() and stem_path(self.path).is_file()):
            export(encoder, self.path, n_table)
            int8_path(self.path).unlink(missing_ok=True)  # derived from the old graph
            wrote = True
        if self.precision == "int8" and not int8_path(self.path).is_file():
            quantize(self.path)
            wrote = True
        return wrote

    def _open(self, spinning: bool) -> None:
        self.session = cpu_session(self.run_path, self.threads, spinning)
        self.stem_session = cpu_session(stem_path(self.path), self.threads, spinning)

    def stem(self, x: torch.Tensor) -> np.ndarray:
        """``x`` 1 x 3 x 1024 x 1024 -> the stem's tokens 1 x 16384 x 128 (numpy float32)."""
        return self.stem_session.run(None, {"x": x.detach().to("cpu", torch.float32).contiguous().numpy()})[0]

    def __call__(self, x: torch.Tensor, ctx: DTAContext, stem: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` B x 3 x 1024 x 1024, ``ctx`` table B x P x 256 / assign B x 64 x 64, ``stem`` B x L x C or None
        -> B x 256 x 64 x 64 float32 (one image per session run)."""
        b = x.shape[0]
        table = ctx.table.detach().to("cpu", torch.float32).contiguous().numpy()
        assign = ctx.assign.detach().to("cpu", torch.int64).contiguous().numpy()
        if table.shape[0] == 1 and b > 1:
            table = np.repeat(table, b, axis=0)
        if assign.shape[0] == 1 and b > 1:
            assign = np.repeat(assign, b, axis=0)
        outs = []
        for i in range(b):
            tokens = self.stem(x[i : i + 1]) if stem is None else \
                stem[i : i + 1].detach().to("cpu", torch.float32).contiguous().numpy()
            feed = {"tokens": tokens, "table": table[i : i + 1], "assign": assign[i : i + 1]}
            outs.append(self.session.run(None, feed)[0])
        out = torch.from_numpy(np.concatenate(outs) if len(outs) > 1 else outs[0])
        return out.to(x.device)


def runnable(encoder: AdaptedEncoder) -> bool:
    """Whether this adapted encoder can be exported here: a TinyViT on the CPU in fp32, onnx + onnxruntime."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    p = next(encoder.parameters())
    return encoder.kind == "tinyvit" and p.device.type == "cpu" and p.dtype == torch.float32


__all__ = ["OrtAdaptedEncoder", "atomic_export", "cpu_session", "open_cached", "export", "quantize", "int8_path",
           "PRECISIONS", "stem_path", "graph_key", "graph_path", "adapted_dir", "runnable"]
