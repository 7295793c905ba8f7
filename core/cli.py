"""The engine's command line: ``python -m core COMMAND ...``.

Each command lives in its own module, which provides ``add_arguments(parser)`` and ``run(args) -> int``; the
module is imported only when its command runs, so ``--help`` is fast and a command's heavy imports stay its own.
Errors a user can cause (:class:`~core.errors.VirefsamError`, running out of memory) end as one sentence on stderr
and exit code 2; a cancel (Ctrl-C) exits 130 with nothing half-written.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import signal
import sys
import threading
import time
from typing import List, Optional

from .errors import CancelledError, VirefsamError

# command -> (module, one-line help)
COMMANDS = {
    "segment": ("segment_cli", "segment target rasters from a reference raster + geometry, write polygons"),
    "demo": ("demo", "run the bundled demo: sample rasters, bundled reference, GeoPackage + PNG"),
    "corrections": ("corrections", "one round of 'Not <class>' corrections on a shared orthophoto, scored"),
    "setup-model": ("modeling.prepare", "fetch, verify and convert the embedded model (done by make setup)"),
    "train": ("training.train", "episodic meta-training of the VCP + DTA adapters"),
    "eval": ("training.evaluate", "few-shot evaluation (mIoU, FB-IoU) on episodes from a dataset"),
    "bench": ("bench", "benchmark report: roofline, encoder, end-to-end, memory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description="ViRefSAM engine (headless).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(_module=module)
        mod = _load(module)
        if mod is not None:
            mod.add_arguments(p)
    return parser


def _load(module: str):
    try:
        return importlib.import_module(f".{module}", __package__)
    except ModuleNotFoundError as exc:  # a command whose module is not written yet, or a missing dependency
        if exc.name and exc.name.startswith(__package__):
            return None
        raise


def _interrupted(args, argv: Optional[List[str]], started: float) -> str:
    """What a Ctrl-C left behind. ``train`` saves ``OUT/checkpoint.pt`` when interrupted: say so, and how to go on."""
    out = getattr(args, "out", None)
    if args.command == "train" and out:
        ckpt = os.path.join(out, "checkpoint.pt")
        if os.path.isfile(ckpt):
            words = list(sys.argv[1:] if argv is None else argv)
            if "--resume" not in words:
                words.append("--resume")
            again = "python -m core " + " ".join(shlex.quote(w) for w in words)
            if os.path.getmtime(ckpt) >= started - 1.0:
                return f"interrupted; the training checkpoint {ckpt} was saved: continue with {again}"
            return f"interrupted before a new step was saved; the checkpoint {ckpt} is unchanged: continue with {again}"
    return "interrupted; nothing was written."


def _listen_for_ctrl_c() -> None:
    """Make SIGINT raise KeyboardInterrupt whatever this process inherited.

    Python turns SIGINT into KeyboardInterrupt only when the process starts with SIGINT at its default; a command
    started by a parent that ignores it (a shell's background job, some test runners and job launchers) would
    otherwise go on after ``kill -INT`` and never save its checkpoint or remove its partial files. A blocked
    SIGINT (inherited signal mask) is unblocked for the same reason."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    mod = _load(args._module)
    if mod is None:
        print(f"error: the command '{args.command}' is not available in this version.", file=sys.stderr)
        return 2
    started = time.time()
    _listen_for_ctrl_c()
    try:
        return int(mod.run(args) or 0)
    except CancelledError as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"cancelled: {_interrupted(args, argv, started)}", file=sys.stderr)
        return 130
    except VirefsamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory: use a smaller --tile-size or a smaller model, then run again.", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError outside the tiles (which fall back to the CPU)
        if "CUDA out of memory" not in str(exc):
            raise
        print("error: the GPU ran out of memory: use --device cpu, a smaller --tile-size or a smaller model.",
              file=sys.stderr)
        return 2
