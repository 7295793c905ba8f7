"""Decoder rows of the encoder section: training-free decoding of one tile after the encoder, per variant."""

from __future__ import annotations


from .inputs import _iou
from .machine import _Threads, race


def bench_decoder(args, pred, tile, bf16: bool, threads: int, rounds: int, log, truth=None) -> dict:
    """Training-free decoding of one real tile (the part after the encoder: pseudo-mask, component prompts,
    SAM's prompt encoder + mask decoder per prompt, prototype filter, union), with the tile's embedding from
    ``pred``'s cache: fp32 with 32 (the default), 16 and 8 prompts at most, 32 through SAM's own MaskDecoder
    module (the decoder before the shared-image regrouping of :mod:`core.modeling.shared_decoder`), and 32 under
    bf16 autocast; the union mask of each compared with the default's (IoU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..modeling.training_free import DEFAULT_CONTEXT, DEFAULT_WINDOW_MARGIN, training_free_logits

    if pred._protos is None:  # static_prompt mode: nothing to measure here
        return None
    t = pred._encode([tile])[0]  # cached by the predict() before
    eng = pred.engine

    def decode(max_prompts, n_threads, dtype=None, chunk=16, shared=True, window=DEFAULT_WINDOW_MARGIN,
               context=DEFAULT_CONTEXT):
        def fn():
            with _Threads(n_threads), torch.inference_mode(), torch.autocast(
                "cpu", dtype=torch.bfloat16, enabled=dtype is not None
            ):
                low, info = training_free_logits(eng.sam, t.plain, pred._protos, t.valid, max_prompts, True,
                                                 chunk=chunk, shared=shared, window_margin=window if shared else None,
                                                 context=context if shared else None)
                logits = eng.postprocess(low.float(), t.input_size, t.original_size)
            return (logits[0, 0] > 0).numpy(), int(info["n_prompts"])
        return fn

    win = f"masks upscaled within {1 + DEFAULT_WINDOW_MARGIN:g}x their box"
    crop = (f"local: each prompt on a crop of {1 + 2 * DEFAULT_CONTEXT[0]:g}x its box, at least "
            f"{DEFAULT_CONTEXT[1]}x{DEFAULT_CONTEXT[1]} cells")
    variants = {"fp32_32": decode(32, threads), "fp32_32_exact": decode(32, threads, context=None),
                "fp32_32_whole": decode(32, threads, window=None, context=None),
                "fp32_32_module": decode(32, threads, shared=False),
                "fp32_16": decode(16, threads), "fp32_8": decode(8, threads)}
    labels = {"fp32_32": f"fp32, 32 prompts at most, {crop} (default), {threads} threads",
              "fp32_32_exact": f"fp32, 32 prompts at most, exact (whole-tile attention), {win} (before local "
                               f"decoding), {threads} threads",
              "fp32_32_whole": f"fp32, 32 prompts at most, exact, whole-tile masks (before the windows), "
                               f"{threads} threads",
              "fp32_32_module": f"fp32, 32 prompts at most, SAM's MaskDecoder module (before #8), {threads} threads",
              "fp32_16": f"fp32, 16 prompts at most, {threads} threads",
              "fp32_8": f"fp32, 8 prompts at most, {threads} threads"}
    if not args.quick:
        for c in (4,):
            variants[f"fp32_32_c{c}"] = decode(32, threads, chunk=c)
            labels[f"fp32_32_c{c}"] = f"fp32, 32 prompts at most, {c} per decoder call (default 16), {threads} threads"
        if threads != 1:
            variants["fp32_32_t1"] = decode(32, 1)
            labels["fp32_32_t1"] = "fp32, 32 prompts at most, 1 thread"
    if bf16:
        variants["bf16_32"] = decode(32, threads, torch.bfloat16)
        labels["bf16_32"] = f"bf16 autocast, 32 prompts at most, {threads} threads"
        if not args.quick:
            variants["bf16_32_c4"] = decode(32, threads, torch.bfloat16, chunk=4)
            labels["bf16_32_c4"] = f"bf16 autocast, 32 prompts at most, 4 per decoder call, {threads} threads"
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        _, n32 = decode(32, threads)()
    gflop = fc.get_total_flops() / 1e9
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        decode(32, threads, shared=False)()
    gflop_module = fc.get_total_flops() / 1e9
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        decode(32, threads, window=None, context=None)()
    gflop_whole = fc.get_total_flops() / 1e9
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        decode(32, threads, context=None)()
    gflop_exact = fc.get_total_flops() / 1e9
    log(f"  decoder (training-free, real tile): {n32} prompts, {gflop:.1f} GFLOP ({gflop_exact:.1f} exact, "
        f"{gflop_whole:.1f} with whole-tile masks, {gflop_module:.1f} through SAM's MaskDecoder module)")
    times, outs = race(variants, rounds, warmup=not args.quick, log=log)
    ref_mask = outs["fp32_32"][0]
    whole_mask = outs["fp32_32_whole"][0]
    res = {"mode": "training_free", "gflop_32_prompts": round(gflop, 2),
           "gflop_32_prompts_whole": round(gflop_whole, 2), "window_margin": DEFAULT_WINDOW_MARGIN,
           "gflop_32_prompts_exact": round(gflop_exact, 2), "context": list(DEFAULT_CONTEXT),
           "gflop_32_prompts_module": round(gflop_module, 2), "variants": {}}
    for k, v in times.items():
        res["variants"][k] = {"label": labels[k], "seconds": round(v["seconds"], 3), "runs": v["all"],
                              "prompts": outs[k][1], "iou_vs_default": _iou(outs[k][0], ref_mask),
                              "iou_vs_whole": _iou(outs[k][0], whole_mask),
                              "iou_vs_truth": _iou(outs[k][0], truth) if truth is not None else None}
    return res
