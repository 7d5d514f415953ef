"""Select the training device and numeric precision, and log the reason."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """A requested device or precision is not available on this machine."""


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16() -> bool:
    """True when the CPU runs bf16 matrix multiplies natively (AMX or AVX-512 BF16)."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def select_device(requested: str) -> torch.device:
    if requested == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("device auto: using %s", device)
        return device
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device 'cuda' was requested but none is usable: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
            f"{torch.cuda.device_count()} device(s) found). "
            "Set pretrain.device (or the --device option) to cpu or auto."
        )
    return torch.device(requested)


def select_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype (None for fp32) for ``requested`` on ``device``."""
    if requested == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        reason = "the GPU supports bf16" if supported else "the GPU lacks bf16"
    else:
        supported = cpu_has_fast_bf16()
        reason = "the CPU has AMX or AVX-512 BF16" if supported else "the CPU has neither AMX nor AVX-512 BF16"
    if requested == "bf16" and not supported:
        log.warning("precision bf16 requested but %s; it will run, slowly", reason)
        return torch.bfloat16
    if requested == "auto":
        log.info("precision auto: %s because %s", "bf16" if supported else "fp32", reason)
        return torch.bfloat16 if supported else None
    return torch.bfloat16
