"""Where the model runs: device, precision and CPU threads, with one-sentence refusals.

``device``     ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
``precision``  ``fp32`` (default, everywhere), ``bf16`` (CUDA, or a CPU with native bfloat16 support:
               AVX512-BF16 or AMX) or ``fp16`` (CUDA only). Half precisions apply through autocast to the image
               encoder and to the training-free decoding; weights stay in float32.
``threads``    CPU threads for torch; 0 leaves torch's default.
"""

from __future__ import annotations

from .errors import ModelError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")


def cuda_available() -> bool:
    import torch

    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver reads as "no CUDA"
        return False


def resolve_device(device: str = "auto"):
    """``auto`` / ``cpu`` / ``cuda`` (or ``cuda:N``) -> ``torch.device``."""
    import torch

    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not cuda_available():
            raise ModelError("CUDA was chosen but no CUDA GPU is available to PyTorch: choose 'auto' or 'cpu'.")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(
                f"CUDA device {dev.index} does not exist (this machine has {torch.cuda.device_count()}): choose 'cuda'."
            )
        return dev
    raise ModelError(f"Unknown device '{device}': choose one of {', '.join(DEVICES)}.")


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX512-BF16 or AMX), not by emulation."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        pass
    try:  # older builds: read the CPU flags
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def cpu_int8_is_exact() -> bool:
    """Whether ONNX Runtime's int8 matrix products (uint8 activations x int8 weights) are exact on this CPU.

    On x86 without VNNI they use VPMADDUBSW, whose int16 sums of pairs of products saturate (ONNX Runtime's
    quantization guide names this), and masks can drift further from fp32 (a CI machine of unknown CPU measured
    IoU 0.973 on a real tile, against 0.988 here with AVX512-VNNI). With AVX512-VNNI or AVX-VNNI (or any non-x86
    CPU) the products are summed in int32."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True
    try:
        from numpy.core._multiarray_umath import __cpu_features__ as features  # every OS, numpy < 2

        if features.get("AVX512VNNI"):
            return True
    except ImportError:
        pass
    try:  # AVX-VNNI (256-bit, e.g. Alder Lake) is not in numpy's list
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
        return "avx512_vnni" in flags or "avx_vnni" in flags
    except OSError:
        return False


def resolve_precision(precision: str, device) -> "object":
    """``fp32`` / ``bf16`` / ``fp16`` on ``device`` -> ``torch.dtype``, refusing what the device cannot do."""
    import torch

    name = (precision or "fp32").strip().lower()
    dev = torch.device(device)
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        if dev.type == "cuda":
            if not torch.cuda.is_bf16_supported():
                raise ModelError("This GPU does not support bf16: choose fp16 or fp32.")
            return torch.bfloat16
        if dev.type == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        raise ModelError("This CPU has no native bf16 support (AVX512-BF16 or AMX): choose fp32.")
    if name == "fp16":
        if dev.type == "cuda":
            return torch.float16
        raise ModelError("fp16 runs on CUDA GPUs only: choose fp32 (or bf16 on a CPU that supports it).")
    raise ModelError(f"Unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}.")


def set_threads(n: int = 0) -> None:
    """Use ``n`` CPU threads in torch; 0 (or less) leaves torch's default."""
    import torch

    n = int(n or 0)
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)
