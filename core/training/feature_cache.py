"""On-disk cache of frozen features per image, for training and evaluation.

The frozen SAM image encoder dominates the cost on a CPU (2-6 s per 1024-px image here) and its output does not
depend on the episode, the class or the adapters: a reference's features and a target's *plain* embedding are
the same tensor. They are computed once per (model, dataset, image) and stored as float16 ``.npy`` files::

    ROOT/<model tag>/<dataset name>/<image key, sanitised>.npy

The model tag names the encoder and its weights (e.g. ``sam-embedded-<sha256[:12]>``), so features of another
model never mix in. Writes are atomic (temporary name, then rename).
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch


class FeatureCache:
    def __init__(self, root, tag: str) -> None:
        self.root = Path(root)
        self.tag = re.sub(r"[^A-Za-z0-9_.+-]", "_", tag)

    def path(self, dataset: str, key: str) -> Path:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
        return self.root / self.tag / re.sub(r"[^A-Za-z0-9_.-]", "_", dataset) / (name + ".npy")

    def has(self, dataset: str, key: str) -> bool:
        return self.path(dataset, key).is_file()

    def get(self, dataset: str, key: str) -> Optional[torch.Tensor]:
        p = self.path(dataset, key)
        if not p.is_file():
            return None
        try:
            return torch.from_numpy(np.load(p)).float()
        except (ValueError, OSError, EOFError):  # a truncated file: compute again
            return None

    def put(self, dataset: str, key: str, feats: torch.Tensor) -> None:
        p = self.path(dataset, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.npy")  # unique: runs share the cache
        np.save(tmp, feats.detach().float().cpu().numpy().astype(np.float16))
        tmp.replace(p)

    def get_or_compute(self, dataset: str, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        f = self.get(dataset, key)
        if f is None:
            f = compute().detach().float().cpu()
            self.put(dataset, key, f)
            f = torch.from_numpy(f.numpy().astype(np.float16)).float()  # what a later read returns
        return f


def model_tag(sam, name: str = "sam") -> str:
    """``<name>-<12 hex>``: a fingerprint of the image encoder's weights (first tensors and the neck)."""
    import hashlib

    h = hashlib.sha256()
    params = list(sam.image_encoder.named_parameters())
    for pname, p in params[:3] + [q for q in params if q[0].startswith("neck.")]:
        h.update(pname.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return f"{name}-{h.hexdigest()[:12]}"


class CachedEngine:
    """A :class:`core.modeling.engine.SamEngine` whose frozen ``encode`` reads and fills a :class:`FeatureCache`.

    Entries are keyed by a hash of each preprocessed input (``Bx3x1024x1024``), so everything that calls
    ``engine.encode`` -- the :class:`ReferencePredictor` of every mode, the training loop -- reuses the
    embedding of an image it has seen, in this run or an earlier one. Everything else is the engine's own.
    Cached embeddings are float16-rounded (relative error ~1e-3 against a fresh pass).
    """

    def __init__(self, engine, cache: FeatureCache) -> None:
        self._engine = engine
        self.cache = cache
        self.hits = 0
        self.misses = 0
        # no in-memory cache of plain passes beside the disk one: the trained mode's own fresh passes (which hand
        # their stem to the adapted pass) would otherwise reach the other modes unrounded, so that a mode's
        # numbers would depend on which mode ran first
        self.embeddings = None

    def __getattr__(self, name):
        return getattr(self._engine, name)

    @staticmethod
    def input_key(x: torch.Tensor) -> str:
        import hashlib

        a = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest() + f"-{a.shape[-2]}x{a.shape[-1]}"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        keys = [self.input_key(x[i]) for i in range(x.shape[0])]
        got = [self.cache.get("inputs", k) for k in keys]
        todo = [i for i, g in enumerate(got) if g is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            fresh = self._engine.encode(x[todo])
            for j, i in enumerate(todo):
                self.cache.put("inputs", keys[i], fresh[j])
                got[i] = self.cache.get("inputs", keys[i])
        device = getattr(self._engine, "device", x.device)
        return torch.stack(got).to(device)
