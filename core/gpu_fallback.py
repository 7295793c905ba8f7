"""Out of GPU memory: how a run goes on on the CPU.

:func:`_is_cuda_oom` tells CUDA's out-of-memory error from others, :func:`_empty_cuda_cache` frees what the
failed call held, :func:`_cpu_engine_like` builds a CPU engine with the same SAM weights (for the scribbles,
:mod:`core.densify`); :data:`CPU_FALLBACK_NOTE` is the run's note when its predictors went to the CPU
(``core.pipeline.run``).
"""

from __future__ import annotations

CPU_FALLBACK_NOTE = (
    "The GPU ran out of memory, so the run went on on the CPU (slower); choose a smaller tile size or a smaller "
    "model to stay on the GPU."
)


def _is_cuda_oom(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (torch >= 1.13), or the RuntimeError older versions raise for it."""
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def _empty_cuda_cache() -> None:
    import torch

    try:
        torch.cuda.empty_cache()  # a no-op when CUDA was never initialised
    except Exception:  # noqa: BLE001 - a broken driver: nothing to free
        pass


def _cpu_engine_like(engine):
    """A CPU SamEngine (fp32, PyTorch encoder) with the SAM weights of ``engine``, copied to the CPU tensor by
    tensor: the model is not moved (other runs may share ``engine``) and nothing new is put on the GPU."""
    import copy

    import torch

    from .modeling.engine import SamEngine

    sam = engine.sam
    memo = {}
    for t in list(sam.parameters()) + list(sam.buffers()):
        cpu = t.detach().to("cpu", copy=True)
        memo[id(t)] = torch.nn.Parameter(cpu, requires_grad=False) if isinstance(t, torch.nn.Parameter) else cpu
    return SamEngine(copy.deepcopy(sam, memo), device="cpu", precision="fp32")
