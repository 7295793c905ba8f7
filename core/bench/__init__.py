"""``python -m core bench``: how fast the engine runs on this machine, and where the time goes.

Writes ``bench.json`` and ``bench.md`` into ``--out`` (``make bench``: ``out/bench``). Sections:

roofline   fp32 (and bf16 where the CPU has native bf16) ``torch.mm`` throughput of large square matrices, best
           of a few, per thread count: what the encoders' GFLOP/s are compared with.
encoder    the image encoder at 1024x1024 on a real tile: the embedded TinyViT (real weights) and ``vit_b``
           (segment_anything's architecture, RANDOM-INIT weights: the time does not depend on them). FLOPs by
           ``torch.utils.flop_counter.FlopCounterMode`` (on meta tensors), seconds (best of interleaved rounds,
           so a load change hits every variant alike), GFLOP/s, ratio to the roofline; fp32, bf16 autocast,
           thread counts, ONNX Runtime (:mod:`core.modeling.ort_encoder`) and TinyViT with its Conv+BN pairs
           fused; for each the max abs difference of the embedding vs fp32 and, for the embedded model, the
           mask IoU vs fp32 (and vs the ground truth when there is one) after the real predictor on that tile.
e2e        ``core.pipeline.run`` on one reference and one large target (``zanzibar.tif``, 4096x4096): total
           seconds, megapixels/s and the split into read / encoder / VCP / decoder / stitch / vectorise / write.
           The split inside ``predict`` comes from timers wrapped around this run's engine instance
           (``encode``, ``preprocess``, ``postprocess``), forward hooks on SAM's prompt encoder / mask decoder
           and on ViRefSAM's adapted encoder, a timer around ``training_free.decode_prompts``, and wrappers on
           the VCP's methods: nothing in the model code changes. Variants (``--e2e-variants``): the pipeline as
           it is (``baseline``: encoder backend ``auto``), its encoder forced through the engine's
           ``encoder_backend`` to PyTorch (``torch``) or ONNX Runtime (``onnxruntime``), as before #8
           (``before8``: PyTorch encoder, SAM's MaskDecoder module for the training-free prompts), with
           whole-tile masks (``whole``: the shared decoder before its per-prompt windows), with decoding
           ``exact`` (``exact``: every prompt decoded on the whole tile, before local decoding), in virefsam mode
           with random-init adapters (``virefsam``: timing only, the same passes as the shipped adapters that
           the pipeline uses by default; ``vcponly``: adapters trained without DTA, no adapted encoder pass; the
           other variants run the training-free mode, ``--adapters none``), with precision bf16
           (``bf16``: encoder and training-free decoding autocast), each optionally with ``_t<n>`` threads or
           ``_tbest`` (the encoder section's fastest count); ``--e2e-rounds`` interleaves them.
multi      one reference, three targets in one run: encoder calls are counted (the reference crop is
           encoded once, each tile once).
memory     peak memory of ``pipeline.run`` for targets of 2048^2, 4096^2 and 16384^2 pixels, each size in its
           own subprocess (so the peak is that size's). The targets are VRTs of the real zanzibar.tif
           (cropped, or mosaicked 4x4 for 16384^2). Reading, stitching, vectorising and writing run over the
           full raster; only the first ``--max-tiles`` tiles go through the model (256+ tiles would take hours
           on 2 cores), later tiles reuse those tiles' real probabilities (so vectorising sees realistic maps).
           The largest size runs once more with ``GDAL_CACHEMAX=64`` (MB) to show what grows with the raster.

Timings are wall-clock ``perf_counter`` (with ``torch.cuda.synchronize`` on CUDA). ``--quick`` runs every
section on small inputs (about 1-2 minutes) for the test suite: its numbers are not meant to be read. Speed
goals live in this report, never in a timed test.

Files (a section per file; ``cli`` calls them in order):

cli.py       options (``add_arguments``) and ``run``: every section, then bench.json / bench.md
machine.py   machine facts, thread counts, :func:`race` (interleaved timing rounds)
inputs.py    VRT crops / mosaics of the target, the reference, a real tile and its truth
roofline.py  ``torch.mm`` GFLOP/s
encoder.py   the encoder section (and the masks of each variant)
decoder.py   the decoder rows of the encoder section
probe.py     the timers installed around one ``pipeline.run``
e2e.py       the e2e section; its variants are registered in :data:`e2e.E2E_VARIANTS` (add a row there)
memory.py    the memory section (one subprocess per size)
report.py    speed steps, best thread counts, notes, bench.md
"""

from .cli import DEFAULT_REFERENCE, DEFAULT_REFERENCE_GEOMETRY, DEFAULT_TARGET, SCHEMA, SECTIONS, add_arguments, run
from .decoder import bench_decoder
from .e2e import E2E_KINDS, E2E_VARIANTS, E2EVariant, make_random_adapters, run_e2e, run_params, variant
from .encoder import bench_encoders, count_gflop, fuse_conv_bn, mask_agreement
from .inputs import mosaic_vrt, real_tile, reference_spec
from .machine import machine_info, race
from .memory import bench_memory, memory_child
from .probe import Probe
from .report import best_threads, render_markdown, speed_steps
from .roofline import bench_roofline, matmul_gflops

__all__ = [
    "DEFAULT_REFERENCE", "DEFAULT_REFERENCE_GEOMETRY", "DEFAULT_TARGET", "SCHEMA", "SECTIONS", "add_arguments", "run",
    "bench_decoder", "E2E_KINDS", "E2E_VARIANTS", "E2EVariant", "make_random_adapters", "run_e2e", "run_params",
    "variant", "bench_encoders", "count_gflop", "fuse_conv_bn", "mask_agreement", "mosaic_vrt", "real_tile",
    "reference_spec", "machine_info", "race", "bench_memory", "memory_child", "Probe", "best_threads",
    "render_markdown", "speed_steps", "bench_roofline", "matmul_gflops",
]
