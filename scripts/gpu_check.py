"""`make gpu-check`: the project's checks on a CUDA GPU, in one command, into out/gpu-check/.

Steps (each a subprocess with its own time limit; a failed step is recorded and the next one runs):
  env        Python, torch, CUDA and the GPU's name, which of the project's imports work
  setup      `make setup` (bash scripts/setup.sh) when an import is missing (skipped with --no-setup)
  demo       `python -m core demo --device cuda` in fp32 and fp16: scores vs OSM and seconds
  e2e        core.bench.default.e2e_default_vs_training_free on the 4096x4096 orthophoto (default path and
             training-free, interleaved), on CUDA fp32
  encoder    core.bench.default.encoder_timing: embedded (real weights) and vit_b (random init), fp32/fp16
  eval       `python -m core eval` smoke: 2 episodes of oam_buildings, training-free and the shipped adapters

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
IMPORTS = ("torch", "numpy", "segment_anything", "mobile_sam", "onnxruntime", "onnx", "rasterio", "shapely",
           "osgeo.gdal")


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def sh(cmd, timeout: int, env=None) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, **(env or {})))
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = 124, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (
            e.stdout or ""), f"timed out after {timeout} s"
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "stdout_tail": out[-1500:],
            "stderr_tail": err[-1500:]}


def py_json(code: str, timeout: int) -> dict:
    """Run ``code`` (which prints one JSON line last) with the project's Python; its JSON or the failure."""
    r = sh([python(), "-c", code], timeout)
    if r["rc"] == 0:
        try:
            r["result"] = json.loads(r["stdout_tail"].strip().splitlines()[-1])
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
info = {"python": sys.version.split()[0], "imports": ok}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.cuda.is_available(), torch_cuda=torch.version.cuda)
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0),
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
except Exception as e:
    info.update(cuda=False, torch=f"{type(e).__name__}: {e}")
print(json.dumps(info))
""" % (IMPORTS,)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "out" / "gpu-check"))
    ap.add_argument("--no-setup", action="store_true", help="never run make setup")
    ap.add_argument("--require-cuda", action="store_true", help="exit 3 when CUDA is absent")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="shared data (eval smoke)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "steps": {}}
    steps = report["steps"]

    def say(msg: str) -> None:
        print(f"gpu-check: {msg}", flush=True)

    say("environment")
    env = py_json(ENV_CODE, 120)
    missing = [m for m, v in env.get("result", {}).get("imports", {}).items() if v is not True]
    if (env["rc"] != 0 or missing) and not args.no_setup:
        say(f"missing imports {missing or '(python failed)'}: running make setup")
        steps["setup"] = sh(["bash", "scripts/setup.sh"], 300)
        env = py_json(ENV_CODE, 120)
    steps["env"] = env
    info = env.get("result", {})
    missing = [m for m, v in info.get("imports", {}).items() if v is not True]
    report["cuda"] = bool(info.get("cuda"))
    report["gpu"] = info.get("gpu")
    if missing:
        report["missing_imports"] = missing
    if not report["cuda"]:
        report["summary"] = ABSENT
        say("CUDA absent: CPU-only encoder smoke (embedded model, fp32, PyTorch and ONNX Runtime)")
        if not missing:
            steps["encoder_cpu"] = py_json(
                "import json; from core.bench.default import encoder_timing; "
                "print(json.dumps(encoder_timing('cpu', ('fp32',), ('embedded',), rounds=1)))", 240)
    elif missing:
        report["summary"] = f"The project's imports {missing} are missing and make setup did not install them."
    else:
        for prec in ("fp32", "fp16"):
            say(f"demo on cuda, {prec}")
            d = out / f"demo_{prec}"
            r = sh([python(), "-m", "core", "demo", "--device", "cuda", "--precision", prec, "--out", str(d),
                    "--quiet"], 180)
            if (d / "demo_scores.json").is_file() and r["rc"] == 0:
                r["scores"] = json.loads((d / "demo_scores.json").read_text())
            steps[f"demo_{prec}"] = r
        say("e2e: default path vs training-free on the 4096x4096 orthophoto (cuda, fp32)")
        steps["e2e"] = py_json(
            "import json; from core.bench.default import e2e_default_vs_training_free as f; "
            "print(json.dumps(f(rounds=2, device='cuda', log=lambda m: None)))", 240)
        say("encoder: embedded and vit_b (random init), fp32 and fp16")
        steps["encoder"] = py_json(
            "import json; from core.bench.default import encoder_timing; "
            "print(json.dumps(encoder_timing('cuda', ('fp32', 'fp16'), rounds=5)))", 180)
        data = Path(args.data) / "oam_buildings"
        if data.is_dir():
            say("eval smoke (oam_buildings, 2 episodes, 1 shot)")
            steps["eval"] = sh([python(), "-m", "core", "eval", "--data", str(data), "--episodes", "2", "--shots",
                                "1", "--modes", "training_free,virefsam", "--adapters",
                                str(ROOT / "resources" / "adapters" / "embedded_virefsam.pt"), "--device", "cuda",
                                "--json", str(out / "eval_smoke.json"), "--quiet"], 180)
            if (out / "eval_smoke.json").is_file():
                steps["eval"]["result"] = json.loads((out / "eval_smoke.json").read_text())
        else:
            steps["eval"] = {"rc": None, "skipped": f"no dataset at {data}"}
        failed = [k for k, v in steps.items() if v.get("rc") not in (0, None)]
        report["summary"] = (f"CUDA GPU {report['gpu']}: all steps ran." if not failed
                             else f"CUDA GPU {report['gpu']}: steps failed: {', '.join(failed)}.")
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    say(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({report['seconds']} s)")
    print(report["summary"], flush=True)
    if not report["cuda"]:
        return 3 if args.require_cuda else 0
    return 0 if "all steps ran" in report["summary"] else 1


def markdown(r: dict) -> str:
    s = r["steps"]
    info = s.get("env", {}).get("result", {})
    lines = [f"# GPU check {r['started']}", "", f"**{r['summary']}**", "",
             f"- GPU: {r.get('gpu') or 'none'}; torch {info.get('torch')} (CUDA {info.get('torch_cuda')}); "
             f"Python {info.get('python')}; {r['seconds']} s in all"]
    if r.get("missing_imports"):
        lines.append(f"- missing imports: {', '.join(r['missing_imports'])}")
    for prec in ("fp32", "fp16"):
        d = s.get(f"demo_{prec}")
        if d:
            sc = d.get("scores", {}).get("scores", [])
            lines.append(f"- demo cuda {prec}: rc {d['rc']}, {d['seconds']} s; " + ", ".join(
                f"{x['target']} IoU {x['iou']:.2f} ({x['houses_found']}/{x['osm_houses']} houses)" for x in sc))
    e = s.get("e2e", {}).get("result")
    if e:
        lines += ["", "## End to end (4096x4096, cuda fp32)", "", "| mode | s | MP/s | non-encoder share |",
                  "|---|---:|---:|---:|"]
        for m, v in e["modes"].items():
            lines.append(f"| {m} | {v['seconds']} | {v['megapixels_per_s']} | {v['non_encoder_share']} |")
        lines.append(f"\nratio default / training-free MP/s: {e['ratio_mp_s']}")
    for key in ("encoder", "encoder_cpu"):
        enc = s.get(key, {}).get("result")
        if enc:
            lines += ["", f"## Image encoder, one 1024x1024 pass ({'cuda' if key == 'encoder' else 'cpu'})", "",
                      "| model | variant | s (median) |", "|---|---|---:|"]
            for m, v in enc.items():
                for k, t in v.items():
                    if isinstance(t, dict):
                        lines.append(f"| {m} ({v['weights']}) | {k} | {t['seconds']} |")
    ev = s.get("eval")
    if ev:
        lines.append(f"\n- eval smoke: rc {ev.get('rc')}, {ev.get('seconds', '-')} s" +
                     (f" ({ev['skipped']})" if ev.get("skipped") else ""))
    failed = [f"- {k}: rc {v.get('rc')}: {v.get('stderr_tail', '')[-300:].strip()}" for k, v in s.items()
              if v.get("rc") not in (0, None)]
    if failed:
        lines += ["", "## Failed steps", ""] + failed
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
