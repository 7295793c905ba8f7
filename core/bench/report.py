"""The report: speed steps, best thread counts, notes and ``bench.md`` from the ``bench.json`` dict."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List



def best_threads(report: dict) -> Dict[str, int]:
    """The fastest thread count for the embedded encoder, in PyTorch and in ORT (from the encoder section)."""
    v = ((report.get("encoder") or {}).get("embedded") or {}).get("variants", {})
    out = {}
    for kind, keys in (("torch", [k for k in v if k == "torch_fp32" or k.startswith("torch_fp32_t")]),
                       ("bf16", [k for k in v if k == "torch_bf16" or k.startswith("torch_bf16_t")]),
                       ("onnxruntime", [k for k in v if k.startswith("onnxruntime")])):
        if keys:
            out[kind] = int(v[min(keys, key=lambda k: v[k]["seconds"])]["threads"])
    return out


def speed_steps(report: dict) -> List[dict]:
    """The embedded encoder's variants as a chain of gains: the baseline, then every variant faster than the one
    before it (slowest first), each against the previous step and the baseline. Variants slower than the baseline
    are listed with ``gain_vs_previous`` None (no step)."""
    enc = (report.get("encoder") or {}).get("embedded") or {}
    v = enc.get("variants", {})
    if "torch_fp32" not in v:
        return []
    base = v["torch_fp32"]["seconds"]
    steps = [{"step": v["torch_fp32"]["label"], "key": "torch_fp32", "seconds": base}]
    rest = sorted((k for k in v if k != "torch_fp32"), key=lambda k: -v[k]["seconds"])
    prev = base
    for k in rest:
        sec = v[k]["seconds"]
        if sec < base:
            steps.append({"step": v[k]["label"], "key": k, "seconds": sec, "gain_vs_previous": round(prev / sec, 2),
                          "gain_vs_baseline": round(base / sec, 2)})
            prev = sec
        else:
            steps.append({"step": v[k]["label"] + " (not faster than the baseline)", "key": k, "seconds": sec,
                          "gain_vs_previous": None, "gain_vs_baseline": round(base / sec, 2)})
    steps[0].update(gain_vs_previous=1.0, gain_vs_baseline=1.0)
    return sorted(steps, key=lambda st: (st["gain_vs_previous"] is None, -st["seconds"]))


def _fmt(v, nd=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x, nd) for x in v)
    return str(v)


def render_markdown(r: dict) -> str:
    m = r["machine"]
    L = ["# ViRefSAM benchmark", ""]
    L.append(f"Run {r['started']} ({'QUICK mode: small inputs, one round; numbers not meant to be read' if r['quick'] else 'full'}), "
             f"{r['seconds']:.0f} s. Load average (1/5/15 min) before: {m.get('load_before')}, after: "
             f"{m.get('load_after')} on {m['cores']} cores"
             + (" - **the machine was loaded: timings are indicative only**" if m.get("loaded") else "") + ".")
    L += ["", "## Machine", "",
          f"- CPU: {m['cpu']}, {m['cores']} cores available, {m['memory_gb']} GB RAM",
          f"- torch {m['torch']} ({m['cpu_capability']}), {m['torch_threads']} threads by default; onnxruntime "
          f"{m['onnxruntime']}; Python {m['python']}",
          f"- native bf16: {m['bf16']} (flags: {', '.join(m['cpu_flags_bf16']) or 'none'})", ""]
    rf = r.get("roofline")
    if rf:
        L += ["## Roofline: torch.mm", "",
              f"Square {rf['n']}x{rf['n']} matrices, best of {rf['repeats']}.", "",
              "| threads | fp32 GFLOP/s | bf16 GFLOP/s |", "|---:|---:|---:|"]
        for t, g in rf["fp32"].items():
            L.append(f"| {t} | {g} | {_fmt((rf.get('bf16') or {}).get(t))} |")
        L.append("")
    enc = r.get("encoder")
    if enc:
        L += ["## Image encoder at 1024x1024", "", f"Input: {enc['tile']}, preprocessed as by SamEngine. Times: "
              "best of interleaved rounds (all rounds listed).", ""]
        for name in ("embedded", "vit_b"):
            e = enc.get(name)
            if not e:
                continue
            title = "embedded (TinyViT-5M)" if name == "embedded" else "vit_b (**random-init weights**)"
            L += [f"### {title}: {e['gflop']} GFLOP per pass; weights: {e['weights']}", "",
                  "| variant | s | GFLOP/s | of roofline | max abs diff vs fp32 | rounds (s) |",
                  "|---|---:|---:|---:|---:|---|"]
            for k, v in e["variants"].items():
                ratio = f"{100 * v['roofline_ratio']:.0f}% of {v['roofline_gflops']}" if v["roofline_ratio"] else "-"
                L.append(f"| {v['label']} | {v['seconds']:.2f} | {v['gflops']} | {ratio} | "
                         f"{_fmt(v['max_abs_diff_vs_fp32'], 6)} | {', '.join(f'{t:.2f}' for t in v['runs'])} |")
            L.append(f"\n(embedding max |value| in fp32: {e['embedding_max_abs']})\n")
            mk = e.get("masks")
            if mk:
                L += [f"Masks on the same tile (real predictor, mode {mk['mode']}, threshold {mk['threshold']}):", "",
                      "| backend | foreground | IoU vs fp32 | IoU vs truth |", "|---|---:|---:|---:|"]
                for k, v in mk["by_backend"].items():
                    L.append(f"| {k} | {v['foreground_fraction']} | {_fmt(v['iou_vs_fp32'], 4)} | "
                             f"{_fmt(v['iou_vs_truth'], 4)} |")
                L.append("")
    dec = (enc or {}).get("decoder")
    if dec:
        L += ["## After the encoder: training-free decoding of the same tile", "",
              f"Pseudo-mask -> one prompt (point + box) per component -> SAM prompt encoder + mask decoder per prompt "
              f"-> prototype filter -> union; {dec['gflop_32_prompts']} GFLOP with 32 prompts at most "
              f"({_fmt(dec.get('gflop_32_prompts_exact'))} decoding each prompt on the whole tile, "
              f"{_fmt(dec.get('gflop_32_prompts_whole'))} with whole-tile masks too, "
              f"{_fmt(dec.get('gflop_32_prompts_module'))} through SAM's MaskDecoder module, which repeats the image "
              f"per prompt; the encoder: {(enc.get('embedded') or {}).get('gflop')}).", "",
              "| variant | s | prompts | mask IoU vs default | mask IoU vs whole-tile masks | IoU vs truth | rounds (s) |",
              "|---|---:|---:|---:|---:|---:|---|"]
        for k, v in dec["variants"].items():
            L.append(f"| {v['label']} | {v['seconds']:.2f} | {v['prompts']} | {_fmt(v['iou_vs_default'], 4)} | "
                     f"{_fmt(v.get('iou_vs_whole'), 4)} | {_fmt(v.get('iou_vs_truth'), 4)} | "
                     f"{', '.join(f'{t:.2f}' for t in v['runs'])} |")
        L.append("")
    steps = r.get("speed_steps")
    if steps:
        L += ["## Encoder speed, step by step (embedded, one 1024x1024 pass)", "",
              "From the table above, slowest first: each step is a variant faster than the step before it.", "",
              "| step | s | gain vs previous | gain vs baseline |", "|---|---:|---:|---:|"]
        for s in steps:
            prev = "-" if s["gain_vs_previous"] is None else f"x{s['gain_vs_previous']}"
            L.append(f"| {s['step']} | {s['seconds']:.2f} | {prev} | x{s['gain_vs_baseline']} |")
        L.append("")
    e2e = r.get("e2e") or []
    if e2e:
        t0 = e2e[0]["targets"][0]
        L += ["## End to end: core.pipeline.run", "",
              f"One reference ({Path(r['args']['reference']).name} + {Path(r['args']['reference_geometry']).name}), "
              f"target {Path(t0['path']).name} ({t0['width']}x{t0['height']}), output "
              f"GeoPackage. Seconds exclude the model load (once per process: {r.get('model_load_seconds')} s).", ""]
        names = [e["variant"] + (" (random-init adapters: timing only)" if e["variant"].startswith("virefsam") else "")
                 for e in e2e]
        L += ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        rows = [("mode", "mode", 0), ("decoding", "decoding", 0), ("encoder backend", "encoder_backend", 0), ("threads", "threads", 0),
                ("total s", "seconds", 1),
                ("all rounds s", "rounds_seconds", 1), ("megapixels/s", "mpix_per_s", 3), ("s per tile", "seconds_per_tile", 2),
                ("tiles", "tiles", 0), ("non-encoder share", "non_encoder_share", 3),
                ("features", "features", 0)]
        for label, key, nd in rows:
            L.append(f"| {label} | " + " | ".join(_fmt(e.get(key), nd) for e in e2e) + " |")
        for part in e2e[0]["split"]:
            L.append(f"| {part} s | " + " | ".join(
                f"{e['split'][part]:.2f} ({100 * e['split'][part] / e['seconds']:.0f}%)" for e in e2e) + " |")
        L.append("| encoder calls (reference / tiles / adapted) | " + " | ".join(
            f"{e['encoder_calls']['reference']} / {e['encoder_calls']['tiles']} / {e['encoder_calls']['adapted']}"
            for e in e2e) + " |")
        if len(e2e) > 1:
            L.append("| gain vs previous column | " + " | ".join(
                "-" if i == 0 else f"x{e2e[i - 1]['seconds'] / e['seconds']:.2f}" for i, e in enumerate(e2e)) + " |")
            L.append("| gain vs first column | " + " | ".join(
                f"x{e2e[0]['seconds'] / e['seconds']:.2f}" for e in e2e) + " |")
        L.append("")
    mt = r.get("multi")
    if mt:
        L += ["## Several targets, one reference", "",
              f"{len(mt['targets'])} targets ({', '.join(str(t['width']) + 'x' + str(t['height']) for t in mt['targets'])}), "
              f"{mt['tiles']} tiles: encoder calls {mt['encoder_calls']['reference']} for the reference, "
              f"{mt['encoder_calls']['tiles']} for tiles; reference crop encoded once: "
              f"**{mt['reference_encoded_once']}**; {mt['seconds']:.1f} s.", ""]
    mem = r.get("memory")
    if mem:
        L += ["## Memory: peak per target size (one subprocess each)", "",
              f"Every tile is read, stitched into the on-disk probability map, vectorised and written; the first "
              f"{mem[0]['model_tiles']} tile(s) go through the model, later tiles reuse their probabilities "
              "(bench-only `--max-tiles`). Peak RSS = VmHWM (includes pages of the memory-mapped probability map, "
              "which the kernel can drop); anon = RssAnon peak (heap: what really has to fit in RAM); file-backed "
              "= RssFile+RssShmem peak (sampled every 20 ms).", "",
              "| size | GDAL_CACHEMAX | tiles (model) | peak RSS MB | peak anon MB | peak file-backed MB | s | features |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
        for x in mem:
            L.append(f"| {x['size']}x{x['size']} ({x['target']}) | {x.get('gdal_cachemax')} | {x['tiles']} ({x['model_tiles']}) | "
                     f"{x['peak_rss_mb']} | {x['peak_anon_mb']} | {x['peak_file_mb']} | {x['seconds']:.1f} | "
                     f"{x['features']} |")
        L.append("")
    lat = r.get("latency")
    if lat:
        L += ["## Model load and first-tile latency (a fresh process, `core/bench/default.py`)", "",
              f"Default path (shipped adapters). Load average before {lat.get('load_average_before')}, after "
              f"{lat.get('load_average_after')}. The export and quantisation rows are cold (into a temporary "
              "folder); the sessions open the model cache's graphs.", "", "| step | s |", "|---|---:|"]
        L += [f"| {k} | {v} |" for k, v in lat["seconds"].items()] + [""]
    cl = r.get("cluster")
    if cl:
        L += ["## The same run on a local Dask cluster (`--cluster local:2`, core/bench/cluster.py)", "",
              "On a machine with fewer cores than workers the workers share the cores: compare the overhead per "
              "tile (worker time not spent predicting) with a tile's time in-process, not the wall times.", "",
              "| run | s | tiles | s per tile | overhead per tile | bytes sent per tile | bytes back per tile | "
              "worker setup s | objects |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for x in cl:
            over = (f"{x['overhead_per_tile_s']} s ({x.get('overhead_per_tile_pct')}%)"
                    if "overhead_per_tile_s" in x else "")
            L.append(f"| {x['run']} | {x['seconds']} | {x['tiles']} | {x['seconds_per_tile']} | {over} | "
                     f"{x.get('bytes_sent_per_tile', '')} | {x.get('bytes_received_per_tile', '')} | "
                     f"{x.get('worker_setup_seconds', '')} | {x['objects']} |")
        L.append("")
    if r.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(L)


def _notes(r: dict) -> List[str]:
    notes = []
    m = r.get("machine", {})
    if m.get("loaded"):
        notes.append(f"The machine was loaded (load average {m.get('load_before')} before, {m.get('load_after')} after, "
                     f"{m.get('cores')} cores): compare variants within one interleaved table, not across runs.")
    enc = (r.get("encoder") or {}).get("embedded") or {}
    v = enc.get("variants", {})
    if "onnxruntime" in v and "torch_fp32" in v:
        notes.append(f"ONNX Runtime runs the same TinyViT graph x{v['torch_fp32']['seconds'] / v['onnxruntime']['seconds']:.2f} "
                     f"faster than PyTorch at the same thread count (max abs diff {v['onnxruntime']['max_abs_diff_vs_fp32']}).")
    bt = r.get("best_threads") or {}
    if bt:
        notes.append(f"Fastest thread count for the embedded encoder here: PyTorch fp32 {bt.get('torch')}, bf16 "
                     f"{bt.get('bf16')}, ONNX Runtime {bt.get('onnxruntime')} (torch's default: {m.get('torch_threads')}).")
    dec = (r.get("encoder") or {}).get("decoder") or {}
    if dec and enc.get("gflop"):
        notes.append(f"Training-free decoding of one tile costs {dec['gflop_32_prompts']} GFLOP "
                     f"({_fmt(dec.get('gflop_32_prompts_module'))} through SAM's MaskDecoder module), the encoder "
                     f"{enc['gflop']}.")
        dv = dec.get("variants", {})
        exact = "fp32_32_exact" if "fp32_32_exact" in dv else "fp32_32"
        if exact in dv and "fp32_32_module" in dv:
            notes.append(f"Shared-image decoder (exact): x{dv['fp32_32_module']['seconds'] / dv[exact]['seconds']:.2f} "
                         f"faster than SAM's MaskDecoder module on the tile (union mask IoU "
                         f"{_fmt(dv['fp32_32_module'].get('iou_vs_whole'), 4)} between the whole-tile masks of both; "
                         f"{_fmt(dv[exact].get('iou_vs_whole'), 4)} with the masks upscaled only near their prompt).")
        if exact in dv and "fp32_32_whole" in dv:
            notes.append(f"Masks upscaled only near their prompt: x{dv['fp32_32_whole']['seconds'] / dv[exact]['seconds']:.2f} "
                         f"faster than whole-tile masks (union mask IoU {_fmt(dv[exact].get('iou_vs_whole'), 4)}).")
        if exact != "fp32_32" and "fp32_32" in dv:
            notes.append(f"Local decoding (the default): x{dv[exact]['seconds'] / dv['fp32_32']['seconds']:.2f} faster "
                         f"than exact decoding; an approximation: union mask IoU "
                         f"{_fmt(dv['fp32_32'].get('iou_vs_whole'), 4)} with the whole-tile decoding, IoU vs truth "
                         f"{_fmt(dv['fp32_32'].get('iou_vs_truth'), 4)} against {_fmt(dv[exact].get('iou_vs_truth'), 4)}.")
    for e in r.get("e2e") or []:
        s = e["non_encoder_share"]
        if s is not None:
            notes.append(f"e2e {e['variant']} ({e['mode']}): non-encoder share {100 * s:.1f}% (goal < 15%), "
                         f"{e['seconds_per_tile']:.2f} s per tile.")
    rows = {e["variant"]: e for e in r.get("e2e") or []}
    for one_name, two_name in (("baseline", "twoclass"), ("default", "twoclass_default")):
        if one_name in rows and two_name in rows:
            one, two = rows[one_name]["seconds"], rows[two_name]["seconds"]
            notes.append(f"Two classes in one run ({rows[one_name]['mode']}): {two:.1f} s against {one:.1f} s for "
                         f"one class on the same target (x{two / one:.2f}; goal <= 1.3x).")
    mem = r.get("memory") or []
    default = [x for x in mem if x.get("gdal_cachemax") == mem[0].get("gdal_cachemax")] if mem else []
    if len(default) >= 2:
        a, b = default[0], default[-1]
        notes.append(f"Peak anon memory {a['peak_anon_mb']} MB at {a['size']}^2 vs {b['peak_anon_mb']} MB at "
                     f"{b['size']}^2 ({b['pixels'] / a['pixels']:.0f}x the pixels).")
        for x in mem[len(default):]:
            notes.append(f"With GDAL_CACHEMAX={x['gdal_cachemax']}: {x['peak_anon_mb']} MB anon at {x['size']}^2 "
                         "(GDAL's block cache, 5% of RAM by default, is what grows).")
    return notes
