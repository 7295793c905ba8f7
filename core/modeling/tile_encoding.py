"""A tile through the frozen encoder once: the predictor's input check, its cache key and the plain pass.

:class:`TileEncoding` is a mixin of :class:`.predictor.ReferencePredictor` (it uses the predictor's ``engine``,
``sam``, ``model``, ``_cache`` and ``cache_size``): ``_encode`` preprocesses the images, runs the frozen encoder
once for those not yet in the cache (one batched pass; the engine's own cache of plain passes is asked first)
and returns each as a :class:`_Target`, the stem's tokens beside the plain embedding where the adapted pass runs
in ONNX Runtime.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import InputError
from .prototypes import valid_grid


@dataclass
class _Target:
    x: torch.Tensor  # 1 x 3 x 1024 x 1024
    input_size: Tuple[int, int]
    original_size: Tuple[int, int]
    plain: torch.Tensor  # 1 x 256 x 64 x 64
    valid: torch.Tensor  # 1 x 64 x 64 bool
    stem: Optional[torch.Tensor] = None  # 1 x 16384 x 128: the plain pass's stem tokens, for the adapted pass in ORT


def _check_image(image, what: str = "image") -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise InputError(f"The {what} must be an RGB array of shape HxWx3 and type uint8, got {a.shape} {a.dtype}.")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise InputError(f"The {what} is too small ({a.shape[1]}x{a.shape[0]} pixels).")
    return a


def _digest(image: np.ndarray) -> str:
    """The tile's cache key: sha256 of its shape and pixels (SHA extensions make it the fastest hash in hashlib
    on current x86 CPUs: 1.5 ms for a 1024 x 1024 RGB tile, blake2b 2.6 ms); the pixels are not copied."""
    h = hashlib.sha256()
    h.update(str(image.shape).encode())
    h.update(memoryview(np.ascontiguousarray(image)).cast("B"))
    return h.hexdigest()


class TileEncoding:
    """The frozen-encoder pass of :class:`.predictor.ReferencePredictor` (a mixin; see the module doc)."""

    def _device(self) -> torch.device:
        dev = getattr(self.engine, "device", None)
        return torch.device(dev) if dev is not None else next(self.sam.parameters()).device

    def _encode(self, images: Sequence[np.ndarray]) -> List[_Target]:
        """Preprocess and run the frozen encoder once for all images not in the cache (one batched pass)."""
        keys = [f"{id(self.sam):x}:{_digest(im)}" for im in images]  # the model is part of the key
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        fresh = {}
        if todo:
            pre = [self.engine.preprocess(images[i]) for i in todo]
            xs = torch.cat([p[0] for p in pre])
            # the engine's cache holds plain passes of earlier runs (other classes on the same tiles)
            shared = getattr(self.engine, "embeddings", None)
            known = [shared.get(keys[i]) if shared is not None else None for i in todo]
            stems = None
            if all(k is not None for k in known):
                plain = torch.cat(known).to(self._device())
            else:
                if self.model is not None and self.model.adapted_runner is not None:  # keep the shared stem
                    plain, stems = self.engine.encode_with_stem(xs)
                else:
                    plain = self.engine.encode(xs)
                # the plain pass for later runs (the stem is not kept: 8 MB a tile; the adapted pass of a later
                # run makes its own, about 40% of a plain pass)
                if shared is not None:
                    for j, i in enumerate(todo):
                        shared.put(keys[i], plain[j : j + 1])
            for j, i in enumerate(todo):
                input_size = tuple(int(v) for v in pre[j][1])
                valid = valid_grid(input_size, int(xs.shape[-1]), int(plain.shape[-1]), device=plain.device)
                fresh[keys[i]] = _Target(
                    pre[j][0], input_size, tuple(images[i].shape[:2]), plain[j : j + 1], valid[None],
                    None if stems is None else stems[j : j + 1],
                )
        out = []
        for k in keys:
            t = fresh.get(k) or self._cache[k]
            out.append(t)
            if self.cache_size > 0:
                self._cache[k] = t
                self._cache.move_to_end(k)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return out
