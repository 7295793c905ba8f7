"""End-to-end section: one ``core.pipeline.run`` with the :class:`~.probe.Probe` installed, and the split of its time.

Variants are rows of :data:`E2E_VARIANTS` (registered with :func:`variant`, in the order the report shows them):
each says how its run's :class:`~core.params.RunParams` differ from the pipeline as it is, which keyword
arguments of ``training_free.decode_prompts`` it forces (patched for the run only), which encoder's fastest
thread count ``_tbest`` means for it, and what it needs (ONNX Runtime, native bf16, random-init adapters). To add
a row: one ``variant(...)`` call below; ``--e2e-variants NAME`` then runs it (``NAME_t<n>``, ``NAME_tbest`` too).
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

from .inputs import _pixels, reference_spec
from .probe import Probe


@dataclasses.dataclass(frozen=True)
class E2EVariant:
    name: str
    doc: str
    params: Callable = lambda args, params: params  # (args, RunParams) -> RunParams of this variant's run
    decode_prompts: Optional[dict] = None  # keyword arguments forced on training_free.decode_prompts
    threads_kind: str = "torch"  # whose fastest thread count '_tbest' takes: torch | onnxruntime | bf16
    needs: Optional[str] = None  # "onnxruntime" | "bf16": left out where the machine lacks it
    adapters: Optional[str] = None  # "dta" | "vcp": random-init adapters made before the runs (timing only)


E2E_VARIANTS: Dict[str, E2EVariant] = {}


def variant(name: str, doc: str, **kw) -> E2EVariant:
    """Register an e2e variant (a column of the e2e table)."""
    v = E2EVariant(name, doc, **kw)
    E2E_VARIANTS[name] = v
    return v


def _model(params, **kw):
    return dataclasses.replace(params, model=dataclasses.replace(params.model, **kw))


def _adapters(args, params, attr: str):
    return dataclasses.replace(_model(params, adapters=getattr(args, attr)), mode="virefsam")


variant("default", "the default run: ViRefSAM with the shipped adapters (plain pass in ORT fp32, adapted pass in ORT "
        "with int8 weights on the CPU)",
        params=lambda a, p: dataclasses.replace(_model(p, adapters="default"), mode="virefsam"))
variant("auto", "the default run as an analyst starts it (adapters auto): the check on the reference weighs the two "
        "shipped files, then the tiles run with the files it kept (the bench's one marked house keeps the first "
        "alone: the default row plus the check)",
        params=lambda a, p: dataclasses.replace(_model(p, adapters="auto"), mode="virefsam"))
def _blend(args, params):
    from ..engines import adapter_candidates

    files = adapter_candidates(dataclasses.replace(params.model, adapters="auto"))
    return dataclasses.replace(_model(params, adapters=",".join(map(str, files)),
                                      adapter_weights=tuple(1 / len(files) for _ in files) if len(files) > 1 else ()),
                               mode="virefsam")


variant("blend", "the default run where the check keeps every shipped file (equal weights given, as a replay "
        "gives them): the tiles' cost of the widest blend (each objects file's VCP and decodings beside the first "
        "file's run)",
        params=_blend)
variant("default_fp32", "the default run with the adapted pass's ONNX graph in fp32, as before its int8 weights "
        "(ModelParams.adapted_precision)",
        params=lambda a, p: dataclasses.replace(_model(p, adapters="default", adapted_precision="fp32"), mode="virefsam"))
variant("default_no_views", "the default run without the zoomed views of its one-crop reference "
        "(RunParams.zoom_views False: one decoding per tile instead of four, as before them)",
        params=lambda a, p: dataclasses.replace(_model(p, adapters="default"), mode="virefsam", zoom_views=False))
variant("auto_no_self_support", "the default run (adapters auto) without self-support on the targets "
        "(RunParams.self_support False: one decoding and VCP set fewer per tile, the default before session 21)",
        params=lambda a, p: dataclasses.replace(_model(p, adapters="auto"), mode="virefsam", self_support=False))
variant("auto_lean", "the default run (adapters auto) without self-support and without the zoomed views: one "
        "decoding and VCP set per tile instead of five, two plain passes fewer per reference (what #21's speed "
        "would cost #20's accuracy: model card, 'Zoomed views' and 'Session 20')",
        params=lambda a, p: dataclasses.replace(_model(p, adapters="auto"), mode="virefsam", self_support=False,
                                                zoom_views=False))
variant("baseline", "the pipeline as it is (encoder backend auto: ORT for the embedded model on the CPU)",
        threads_kind="auto")
def _two_classes(args, params):
    """The baseline's run with a second class (the same marks under another name and ref_id): one run, two classes."""
    from ..params import ClassSpec

    second = tuple(dataclasses.replace(r, ref_id=r.ref_id + "_b") for r in params.references)
    return dataclasses.replace(params, class_name="building+building_b", references=(),
                               classes=(ClassSpec("building", params.references), ClassSpec("building_b", second)))


variant("twoclass", "the baseline with two classes in one run (the second: the same marks under another name; each "
        "tile read and encoded once, prototypes matched and decoded per class). Goal: at most 1.3x the baseline",
        params=_two_classes, threads_kind="auto")
variant("twoclass_default", "the default run (shipped adapters) with two classes in one run (as twoclass): one "
        "adapted pass per tile for both classes (core.modeling.joint_dta), VCP and the decoder per class. Goal: at "
        "most 1.3x default",
        params=lambda a, p: _two_classes(a, dataclasses.replace(_model(p, adapters="default"), mode="virefsam")))
variant("torch", "the encoder forced to PyTorch through the engine's encoder_backend",
        params=lambda a, p: _model(p, encoder_backend="torch"))
variant("onnxruntime", "the encoder forced to ONNX Runtime through the engine's encoder_backend",
        params=lambda a, p: _model(p, encoder_backend="onnxruntime"), threads_kind="onnxruntime",
        needs="onnxruntime")
variant("before8", "as before #8: PyTorch encoder, SAM's MaskDecoder module per batch of prompts, exact decoding",
        params=lambda a, p: dataclasses.replace(_model(p, encoder_backend="torch"), decoding="exact"),
        decode_prompts={"shared": False})
variant("whole", "the shared decoder with whole-tile masks (before the per-prompt windows), exact decoding",
        params=lambda a, p: dataclasses.replace(p, decoding="exact"), decode_prompts={"window_margin": None})
variant("exact", "every prompt decoded on the whole tile (before local decoding)",
        params=lambda a, p: dataclasses.replace(p, decoding="exact"))
variant("virefsam", "virefsam mode with random-init adapters (timing only: the passes cost the same trained)",
        params=lambda a, p: _adapters(a, p, "random_adapters"), adapters="dta")
variant("vcponly", "virefsam mode with random-init adapters trained without DTA (no adapted encoder pass)",
        params=lambda a, p: _adapters(a, p, "random_adapters_vcp"), adapters="vcp")
variant("bf16", "precision bf16: the engine's autocast of the encoder and the training-free decoding",
        params=lambda a, p: _model(p, precision="bf16"), threads_kind="bf16", needs="bf16")

E2E_KINDS = tuple(E2E_VARIANTS)


def run_params(args, targets: Sequence[str], output: str):
    from ..params import ModelParams, RunParams

    adapters = None if args.adapters == "none" else args.adapters
    return RunParams(
        class_name="building",
        references=(reference_spec(args.reference, args.reference_geometry),),
        targets=tuple(str(t) for t in targets),
        output=output,
        overwrite=True,
        model=ModelParams(adapters=adapters, device=getattr(args, "device", "cpu"), threads=args.threads),
    )


def make_random_adapters(args, path: Path, dta: bool = True) -> Path:
    """A VCP + DTA adapter file with random-init weights for the pipeline's model (timing of the virefsam mode
    only: its passes do not depend on the weights); ``dta=False``: marked as trained without DTA (``--no-dta``),
    so the run skips the adapted encoder pass."""
    import torch

    from .. import pipeline
    from ..modeling.virefsam import ViRefSAM

    engine = pipeline.load_engine(run_params(args, [args.target], None).model)
    torch.manual_seed(0)
    blob = ViRefSAM(engine.sam).adapter_state_dict()
    blob["training"] = {"dta": dta, "note": "random-init weights: bench timing only"}
    torch.save(blob, path)
    return path


def run_e2e(args, targets: Sequence[str], output: str, variant: str = "baseline",
            max_tiles: Optional[int] = None, log=print, label: Optional[str] = None) -> dict:
    """One ``pipeline.run`` with the probe installed; the split of its time (see the module docstring)."""
    from .. import pipeline
    from ..modeling import training_free

    import torch

    m = re.fullmatch(r"(%s)(?:_t(\d+|best))?" % "|".join(E2E_VARIANTS), variant)
    if not m:
        raise ValueError(f"unknown e2e variant {variant!r}: {', '.join(E2E_VARIANTS)}, optionally + _t<threads>")
    kind, n_threads = m.group(1), m.group(2) or 0
    row = E2E_VARIANTS[kind]
    if n_threads == "best":  # the fastest thread count of the encoder section (torch's default without it)
        best = getattr(args, "best_threads", None) or {}
        n_threads = best.get(_threads_kind(kind), 0)
    n_threads = int(n_threads)
    params = row.params(args, run_params(args, targets, output))
    if n_threads:
        params = dataclasses.replace(params, model=dataclasses.replace(params.model, threads=n_threads))
    prev_threads = torch.get_num_threads()
    t0 = time.perf_counter()
    engine = pipeline.load_engine(params.model)
    model_load = time.perf_counter() - t0
    if getattr(engine, "embeddings", None) is not None:
        engine.embeddings.clear()  # every timed run starts cold: no plain pass reused from an earlier section
    decode_prompts = training_free.decode_prompts
    try:
        if row.decode_prompts:  # e.g. before8: SAM's MaskDecoder module; whole: whole-tile masks
            forced = dict(row.decode_prompts)
            training_free.decode_prompts = lambda *a, **k: decode_prompts(*a, **{**k, **forced})
        with Probe(engine, max_tiles=max_tiles) as probe:
            result = pipeline.run(params)
    finally:
        training_free.decode_prompts = decode_prompts
        torch.set_num_threads(prev_threads)
    if probe.mode is None:
        raise RuntimeError("the bench's timers were not installed: core.pipeline.run no longer builds its "
                           "ReferencePredictor from core.modeling.predictor at run time; update core/bench/probe.py")
    tm = dict(result.timings)
    sizes = [_pixels(t) for t in targets]
    pixels = sum(w * h for w, h in sizes)
    # at the working scale the run chose (scale auto may zoom the targets in: more tiles than at scale 1)
    tiles = sum(t.tiles for t in result.targets)
    # the engine is cached per process: model load reported apart; the probe's own bookkeeping is not the pipeline's
    total = result.seconds - tm.get("model", 0.0) - sum(probe.overhead.values())
    enc_tiles = probe.get("tiles", "encode")
    enc_adapted = probe.get("tiles", "encoder_adapted")
    enc_ref = probe.get("reference", "encode") + probe.get("reference", "encoder_adapted")
    parts = {
        "reference (other)": tm.get("reference", 0.0) - enc_ref - probe.overhead["reference"],
        "reference encoder": enc_ref,
        "read": tm.get("read", 0.0),
        "encoder (frozen pass)": enc_tiles,
        "encoder (adapted pass)": enc_adapted,
        "VCP": probe.get("tiles", "vcp"),
        "decoder": probe.get("tiles", "decoder") + probe.get("tiles", "prompt_encoder"),
        "pre/postprocess": probe.get("tiles", "preprocess") + probe.get("tiles", "postprocess"),
    }
    parts["predict (other)"] = tm.get("predict", 0.0) - probe.overhead["tiles"] - sum(
        parts[k] for k in ("encoder (frozen pass)", "encoder (adapted pass)", "VCP", "decoder", "pre/postprocess"))
    parts.update({"stitch": tm.get("stitch", 0.0), "vectorize": tm.get("vectorize", 0.0),
                  "write": tm.get("write", 0.0)})
    parts["unaccounted"] = total - sum(parts.values())
    encoder_all = enc_tiles + enc_adapted + enc_ref
    ref_digests = {d for ph, d in probe.encodes if ph == "reference"}
    out = {
        "variant": label or variant,
        "encoder_backend": getattr(engine, "encoder_backend", "torch"),
        "threads": n_threads or prev_threads,
        "targets": [{"path": str(t), "width": w, "height": h} for t, (w, h) in zip(targets, sizes)],
        "mode": probe.mode,
        "decoding": params.decoding,
        "pixels": pixels,
        "tiles": tiles,
        "model_tiles": probe.model_tiles,
        "reused_tiles": probe.reused_tiles,
        "model_load_seconds": round(model_load, 3),
        "probe_overhead_seconds": round(sum(probe.overhead.values()), 3),
        "seconds": round(total, 3),
        "mpix_per_s": round(pixels / 1e6 / total, 4) if total > 0 else None,
        "seconds_per_tile": round(total / max(1, tiles), 3),
        "split": {k: round(v, 3) for k, v in parts.items()},
        "encoder_seconds": round(encoder_all, 3),
        "non_encoder_seconds": round(total - encoder_all, 3),
        "non_encoder_share": round((total - encoder_all) / total, 4) if total > 0 else None,
        "encoder_calls": {"reference": sum(1 for ph, _ in probe.encodes if ph == "reference"),
                          "tiles": sum(1 for ph, _ in probe.encodes if ph == "tiles"),
                          "adapted": probe.n("tiles", "encoder_adapted")},
        "reference_encoded_once": bool(ref_digests) and all(
            sum(1 for _, d in probe.encodes if d == r) == 1 for r in ref_digests),
        # the ORT adapted pass of each tile reuses the plain pass's stem (False: it ran the stem again)
        "adapted_stem_shared": not probe.adapted_stem[("tiles", False)],
        "decoder_calls": probe.n("tiles", "decoder"),
        "features": sum(len(t.features) for t in result.targets),
        "adapters": [n for n in result.notes if n.startswith("Adapters auto:")],  # what the check kept (auto)
        "pipeline_timings": {k: round(v, 3) for k, v in tm.items()},
    }
    log(f"  e2e {label or variant}: {out['seconds']:.1f}s for {tiles} tiles, {out['mpix_per_s']} MP/s, non-encoder share "
        f"{out['non_encoder_share']}, encoder calls {out['encoder_calls']}")
    return out


def _threads_kind(kind: str) -> str:
    """Which encoder's fastest thread count (``best_threads``) an e2e variant kind uses."""
    row = E2E_VARIANTS.get(kind)
    tk = row.threads_kind if row is not None else "torch"
    if tk == "auto":  # encoder backend auto: ORT where it can run
        from ..modeling import ort_encoder

        return "onnxruntime" if ort_encoder.available() else "torch"
    return tk
