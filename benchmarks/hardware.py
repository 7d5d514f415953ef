"""Hardware description and matrix-multiply peaks shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """Return the CPU model name and which of CPU_FLAGS /proc/cpuinfo lists (Linux only)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, [flag for flag in CPU_FLAGS if flag in flags]


def describe_hardware(device: torch.device) -> str:
    model, flags = cpu_model_and_flags()
    lines = [
        f"CPU: {model}, {os.cpu_count()} logical cores, flags: {', '.join(flags) or 'none of ' + ', '.join(CPU_FLAGS)}",
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads",
    ]
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    return "\n".join(lines)


def matmul_peak(device: torch.device, precision: str, size: int = 2048, repeats: int = 5) -> float:
    """Return the median TFLOP/s of a square matrix multiply of side ``size``."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e12
