"""Decoding, K-shot and precision choices, shared by the dock and the Processing algorithm.

``core.params.RunParams.decoding``: ``local`` (default) or ``exact``; it only matters when the run is
training-free (no adapters). ``core.params.RunParams.kshot``: ``ensemble`` (default) or ``joint``; it only
matters in the trained mode with several reference crops. ``core.params.ModelParams.precision``: ``fp32`` (default), ``bf16`` or ``fp16``.
A precision the machine cannot run is refused with the engine's one sentence before any model is loaded
(``core.pipeline.check_precision``).
"""

from __future__ import annotations

DECODINGS = (
    ("Local (fast)", "local"),
    ("Exact (SAM on the whole tile)", "exact"),
)
DECODING_TOOLTIP = (
    "How the training-free mode decodes the candidate objects of a tile (adapters do not use it):\n"
    "• Local (fast): each object is decoded on a crop of the tile's embedding around it; about 8x faster decoding "
    "on a CPU, the same accuracy against ground truth.\n"
    "• Exact: each object is decoded on the whole tile, as SAM does."
)
DECODING_HELP = (
    "Training-free mode only. Local (fast): each candidate object is decoded on a crop around it (about 8x faster "
    "decoding on a CPU, the same accuracy). Exact: decoded on the whole tile, as SAM does."
)

KSHOTS = (
    ("Ensemble (default)", "ensemble"),
    ("Joint", "joint"),
)
KSHOT_TOOLTIP = (
    "How several references (or marks far apart, cut as several reference crops) are combined in the trained mode:\n"
    "• Ensemble: each reference is also matched on its own and the results are averaged with the joint one "
    "(better on average on held-out object classes; a little more decoding per tile).\n"
    "• Joint: all references are matched together only (the behaviour of parameters files from before)."
)
KSHOT_HELP = (
    "Trained mode with several reference crops only. Ensemble (default): each reference also decoded on its own, "
    "the probabilities averaged with the joint decoding. Joint: all references decoded together only."
)

TUNE_FILES = (
    ("Objects file, when kept (default)", "vcp_alone"),
    ("Every file", "all"),
    ("Every file when the marks look complete", "auto"),
)
TUNE_FILES_TOOLTIP = (
    "Which adapters files the tuning on the references changes:\n"
    "• Objects file, when kept: only files without DTA adapters (the shipped objects file), and only when the "
    "check on your reference gives them a weight; buildings and land cover, which keep the main file, are not "
    "tuned.\n"
    "• Every file: the main (DTA) file too; it pays only when your references mark every object in their crops.\n"
    "• Every file when the marks look complete: the check on your reference decides; when the adapters find little "
    "of the class beyond your marks (every object in the crops marked), the main file is tuned too, else only the "
    "objects file. The message bar says which."
)

TUNE_TOOLTIP = (
    "Trained mode: before the targets, tune the VCP encoder on your references for this many steps (each reference "
    "the example for the others; one reference with its flips), shown as its own progress step (about 0.5-1 s a "
    "step on a CPU). By default (24 steps) only the objects file is tuned, and only when the check on your "
    "reference keeps it: the compact objects it is for gain (held-out NWPU classes, see the model card), while "
    "buildings, which keep the main file, are left as they are. Tuning the main file too (Files to tune: every "
    "file) pays only when your references mark every object in their crops. 0 = off."
)

EXCLUDE_FOUND_TOOLTIP = (
    "Trained mode: the model first segments the reference crops from their own marks. When it finds more than the "
    "marked area again in objects no mark touches (you marked a few of many), those objects are left out of the "
    "background prototypes: an unmarked house is not background. The run's messages say when this happened. "
    "On by default; marks that cover every object of the class in their crops are not affected."
)
SELF_SUPPORT_TOOLTIP = (
    "Trained mode: each target tile is decoded a second time with its own confidently found objects and "
    "background beside the reference's, so that a target which looks unlike the reference's scene (another "
    "city's roofs) is matched on its own terms. About 5% more time. Measured: Kampala houses from a "
    "Zanzibar reference 0.54 -> 0.58 IoU (six reference picks); same-scene targets unchanged. On by default; "
    "places you mark 'Not <class>' stay out. One reference crop only: with several crops (several references, "
    "or marks far apart) their K-shot ensemble decides, which scored better with five references."
)
ZOOM_VIEWS_TOOLTIP = (
    "Trained mode, one reference crop: it is also matched zoomed out (0.7x) and zoomed in (1.4x), as two more "
    "references, so that objects of the class a little smaller or larger than the marked ones are found too. "
    "Held-out NWPU object classes: +1.2 mIoU on average (three folds, three adapter files); buildings unchanged; "
    "three more decodings per tile, about a quarter more time on a CPU. On by default; several reference crops "
    "get no views."
)

ADAPTED_PRECISIONS = (
    ("int8 (default, faster on a CPU)", "int8"),
    ("fp32", "fp32"),
)
ADAPTED_PRECISION_HELP = (
    "Trained mode on the CPU only, where the adapted (DTA) encoder pass runs in ONNX Runtime. int8 (default): its "
    "weights quantised to int8, about 1.6x faster for that pass, masks agreeing with fp32 (IoU >= 0.99 on real "
    "tiles); on a CPU without VNNI instructions, where int8 products lose precision, fp32 runs instead. fp32: the "
    "pass as exported (the behaviour of parameters files from before)."
)

PRECISIONS = (
    ("fp32 (default)", "fp32"),
    ("bf16 (CUDA, or a CPU with AVX512-BF16 / AMX)", "bf16"),
    ("fp16 (CUDA GPUs only)", "fp16"),
)
PRECISION_TOOLTIP = (
    "Number format of the image encoder (and of the training-free decoding):\n"
    "• fp32: full precision, runs everywhere.\n"
    "• bf16: for CUDA GPUs, or CPUs that compute bf16 natively (AVX512-BF16 or AMX); masks agree closely with "
    "fp32.\n"
    "• fp16: CUDA GPUs only.\n"
    "A choice this computer cannot run is refused with one message before the model is loaded."
)
PRECISION_HELP = (
    "fp32 runs everywhere; bf16 on CUDA GPUs or CPUs with native bf16 (AVX512-BF16 / AMX); fp16 on CUDA GPUs "
    "only. A precision the device cannot run stops the algorithm with one message before the model is loaded."
)

