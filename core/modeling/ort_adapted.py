"""ONNX Runtime backend for ViRefSAM's adapted encoder pass (TinyViT + DTA adapters, CPU, fp32).

The adapted pass (:class:`.dta.AdaptedEncoder`) is exported once per (frozen encoder, adapters) pair to an ONNX
graph whose inputs are the SAM-preprocessed image and the DTA context, and run by ONNX Runtime like the plain
pass (:mod:`.ort_encoder`): ~4x faster than PyTorch fp32 on CPUs, the same embedding within ~1e-6.

    graph inputs:  x      1 x 3 x 1024 x 1024 float32   (SamEngine.preprocess)
                   table  1 x P x 256 float32           (refined prototypes: fg, bg_1..bg_Nb; P = 1 + N_b)
                   assign 1 x 64 x 64 int64 in [0, P]   (Eq. 6 assignment; P = "no prototype")
    graph output:  emb    1 x 256 x 64 x 64 float32

    runner = adapted_runner(model.encoder, threads=2)  # export (or cached graph) + ORT session
    emb = runner(x, DTAContext(table, assign))          # B x 3 x 1024 x 1024 -> B x 256 x 64 x 64 (one image per run)

Cache: the graph is written by the project on first use (``python -m core setup-model`` makes the one of the
shipped adapters ahead of time), never shipped: ``cache_dir()/adapted/<kind>_<key>.onnx`` beside the converted
weights. ``key`` is a sha256 over the weights that go into the graph (the frozen encoder's and the DTA
adapters', names, shapes and bytes) plus the export's settings, so a user's own or retrained adapters file, or
another backbone, gets its own graph. The file is written under a temporary name and renamed into place (a
concurrent process never reads half a graph); a graph that ONNX Runtime cannot load is deleted and exported
again, once.

Only inference goes through ORT: an input that requires grad (training) runs the PyTorch module, and so does
every pass on CUDA or in bf16/fp16 (:meth:`core.modeling.engine.SamEngine.adapted_encoder` decides).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from ..errors import ModelError
from .dta import AdaptedEncoder, DTAContext

OPSET = 17  # LayerNormalization is an ONNX op from 17; onnxruntime >= 1.14 runs it
EXPORT_VERSION = 1  # bump when the exported graph changes for the same weights
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


class _Graph(nn.Module):
    """AdaptedEncoder with the DTA context as separate tensors (what the ONNX exporter traces)."""

    def __init__(self, encoder: AdaptedEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor, table: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, DTAContext(table, assign))


def export(encoder: AdaptedEncoder, path: Path, n_table: int = 6) -> Path:
    """Trace ``encoder`` (float32 CPU copies of the inputs) to ``path``, written atomically (temp + rename)."""
    if getattr(encoder.encoder, "img_size", 1024) != 1024:
        raise ModelError("The ONNX adapted encoder expects 1024x1024 inputs.")
    dev = next(encoder.parameters()).device
    dtype = next(encoder.parameters()).dtype
    if dev.type != "cpu" or dtype != torch.float32:
        raise ModelError("The adapted encoder is exported from float32 weights on the CPU only.")
    x = torch.zeros(1, 3, 1024, 1024)
    table = torch.zeros(1, n_table, encoder.proto_dim)
    assign = torch.zeros(1, GRID, GRID, dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".part", dir=str(path.parent))
    os.close(fd)
    was_training = encoder.training
    try:
        encoder.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Graph(encoder), (x, table, assign), tmp, input_names=["x", "table", "assign"],
                output_names=["emb"], opset_version=OPSET, dynamo=False, do_constant_folding=True,
                dynamic_axes={"table": {1: "P"}},
            )
        os.replace(tmp, path)
    finally:
        encoder.train(was_training)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _session(path: Path, threads: int, spinning: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = max(0, int(threads or 0))
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OrtAdaptedEncoder:
    """The exported adapted encoder in an ONNX Runtime CPU session; ``__call__(x, ctx)`` as the module's forward.

    ``exported``: whether this instance wrote the graph (False: read from the cache); ``rebuilt``: whether a
    damaged cached graph was replaced.
    """

    def __init__(self, encoder: AdaptedEncoder, threads: int = 0, spinning: bool = False,
                 key: Optional[str] = None, n_table: int = 6) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ModelError("onnxruntime is not installed: the adapted encoder runs in PyTorch.") from None
        self.key = key or graph_key(encoder)
        self.path = graph_path(encoder, self.key)
        self.exported = self.rebuilt = False
        with _LOCK:  # one export at a time in this process; other processes are kept apart by the atomic rename
            if not self.path.is_file():
                export(encoder, self.path, n_table)
                self.exported = True
            try:
                self.session = _session(self.path, threads, spinning)
            except Exception:  # noqa: BLE001 - a damaged cached graph (truncated, half-copied): export it again
                if self.exported:
                    raise ModelError(f"ONNX Runtime cannot load the exported adapted encoder {self.path.name}.")
                self.path.unlink(missing_ok=True)
                export(encoder, self.path, n_table)
                self.exported = self.rebuilt = True
                try:
                    self.session = _session(self.path, threads, spinning)
                except Exception:  # noqa: BLE001
                    raise ModelError(
                        f"ONNX Runtime cannot load the exported adapted encoder {self.path.name}."
                    ) from None
        self.threads = max(0, int(threads or 0))

    def __call__(self, x: torch.Tensor, ctx: DTAContext) -> torch.Tensor:
        """``x`` B x 3 x 1024 x 1024, ``ctx`` table B x P x 256 / assign B x 64 x 64 -> B x 256 x 64 x 64 float32."""
        a = x.detach().to("cpu", torch.float32).contiguous().numpy()
        table = ctx.table.detach().to("cpu", torch.float32).contiguous().numpy()
        assign = ctx.assign.detach().to("cpu", torch.int64).contiguous().numpy()
        if table.shape[0] == 1 and a.shape[0] > 1:
            table = np.repeat(table, a.shape[0], axis=0)
        if assign.shape[0] == 1 and a.shape[0] > 1:
            assign = np.repeat(assign, a.shape[0], axis=0)
        outs = [
            self.session.run(None, {"x": a[i : i + 1], "table": table[i : i + 1], "assign": assign[i : i + 1]})[0]
            for i in range(a.shape[0])
        ]
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


__all__ = ["OrtAdaptedEncoder", "export", "graph_key", "graph_path", "adapted_dir", "runnable"]
