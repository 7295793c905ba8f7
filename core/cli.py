"""The engine's command line: ``python -m core COMMAND ...``.

Each command lives in its own module, which provides ``add_arguments(parser)`` and ``run(args) -> int``; the
module is imported only when its command runs, so ``--help`` is fast and a command's heavy imports stay its own.
Errors a user can cause (:class:`~core.errors.VirefsamError`, running out of memory) end as one sentence on stderr
and exit code 2; a cancel (Ctrl-C) exits 130 with nothing half-written.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from .errors import CancelledError, VirefsamError

# command -> (module, one-line help)
COMMANDS = {
    "segment": ("segment_cli", "segment target rasters from a reference raster + geometry, write polygons"),
    "demo": ("demo", "run the bundled demo: sample rasters, bundled reference, GeoPackage + PNG"),
    "setup-model": ("modeling.setup_model", "fetch, verify and convert the embedded model (done by make setup)"),
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
    try:
        return int(mod.run(args) or 0)
    except CancelledError as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("cancelled: interrupted; nothing was written.", file=sys.stderr)
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
