"""Images per second of one pretraining step, per precision and memory format, in one run.

    python benchmarks/train_step.py --method msvq --width 64 --batch 256
    python benchmarks/train_step.py --method mocov2 --image 96 --crop 64 --device cuda

A step is what `msvq pretrain` does per batch: the views are made on the device, the
method's training step runs under autocast when bf16 is chosen, then backward and SGD.
Each variant runs --warmup steps, then --steps timed steps, and reports the median. The
FLOPs of one step come from torch.utils.flop_counter (matrix multiplies and
convolutions, forward and backward), and the matrix-multiply peaks in fp32 and bf16 are
measured in the same run, so the ratios below compare numbers from one machine state.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.hardware import describe_hardware, matmul_peak  # noqa: E402
from msvq.methods import build_method  # noqa: E402
from msvq.models import resnet18  # noqa: E402
from msvq.pretrain import make_views, optimization_step  # noqa: E402

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="msvq", choices=["msvq", "msv", "mq", "ressl", "mocov2"])
    parser.add_argument("--image", type=int, default=32, help="stored image size in pixels (CIFAR: 32)")
    parser.add_argument("--crop", type=int, default=32, help="view size in pixels")
    parser.add_argument("--channels", type=int, default=3, help="image channels")
    parser.add_argument("--batch", type=int, default=256, help="images per step")
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 width (64 is the standard network)")
    parser.add_argument("--bn-splits", type=int, default=8, help="SplitBatchNorm splits")
    parser.add_argument("--queue", type=int, default=4096, help="queue length")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the networks after counting FLOPs (the warm-up steps compile)")
    parser.add_argument("--project-epochs", type=int, default=0,
                        help="also print the time of this many epochs at the measured rate (0: off)")
    parser.add_argument("--epoch-images", type=int, default=50_000,
                        help="images per epoch for --project-epochs (CIFAR-10: 50000)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square matrices of the peak test")
    return parser.parse_args(argv)


def build(args: argparse.Namespace, device: torch.device, channels_last: bool):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    maxpool = args.crop >= 64

    def backbone():
        return resnet18(width=args.width, in_channels=args.channels, maxpool=maxpool, bn_splits=args.bn_splits)

    method = build_method(
        args.method, backbone, proj_hidden=2048, proj_dim=128, m1=0.99, m2=0.95, tau_s=0.1, tau_t=0.04,
        queue_size=args.queue,
    ).to(device=device, memory_format=memory_format)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    return method, optimizer, memory_format


def make_step(args, method, optimizer, memory_format, dtype, images, generator):
    """Return one pretraining step as `msvq pretrain` runs it, on the same batch each time."""

    def step() -> torch.Tensor:
        views = make_views(images, method.view_kinds, args.crop, MEAN[: args.channels], STD[: args.channels],
                           generator, memory_format)
        return optimization_step(method, optimizer, views, dtype, generator).detach()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux and is the process peak, so it only grows across variants.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args, device, precision: str, channels_last: bool) -> dict:
    dtype = torch.bfloat16 if precision == "bf16" else None
    torch.manual_seed(0)
    method, optimizer, memory_format = build(args, device, channels_last)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (args.batch, args.image, args.image, args.channels), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    step = make_step(args, method, optimizer, memory_format, dtype, images, generator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if args.compile:
        method.compile_networks()
    for _ in range(args.warmup):
        step()
    synchronize(device)

    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{precision} produced a non-finite loss {loss.item()}")
    seconds = statistics.median(times)
    return {
        "precision": precision,
        "memory format": "channels_last" if channels_last else "contiguous",
        "images/s": args.batch / seconds,
        "s/step": seconds,
        "TFLOP/s": flops / seconds / 1e12,
        "GFLOP/image": flops / args.batch / 1e9,
        "peak MiB": peak_memory_mib(device),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda requested but torch finds no CUDA device", file=sys.stderr)
        return 1

    print(describe_hardware(device))
    peaks = {precision: matmul_peak(device, precision, args.matmul_size) for precision in ("fp32", "bf16")}
    print(f"matrix-multiply peak ({args.matmul_size}^3, median of 5): "
          + ", ".join(f"{name} {value:.4g} TFLOP/s" for name, value in peaks.items()))
    print(f"step: {args.method}, ResNet-18 width {args.width}, {args.image}px images, {args.crop}px views, "
          f"batch {args.batch}, {args.bn_splits} BN splits, queue {args.queue}, device {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    rows = []
    for precision in args.precisions:
        for channels_last in (False, True):
            row = measure(args, device, precision, channels_last)
            row["of fp32 peak"] = row["TFLOP/s"] / peaks["fp32"]
            row["of bf16 peak"] = row["TFLOP/s"] / peaks["bf16"]
            rows.append(row)
            print(f"  {row['precision']:>4} {row['memory format']:>13}: {row['images/s']:8.1f} images/s  "
                  f"{row['TFLOP/s']:.3f} TFLOP/s ({row['of fp32 peak']:.0%} of fp32 peak, "
                  f"{row['of bf16 peak']:.0%} of bf16 peak)  {row['GFLOP/image']:.2f} GFLOP/image  "
                  f"peak {row['peak MiB']:.0f} MiB", flush=True)
            if args.project_epochs:
                hours = args.project_epochs * args.epoch_images / row["images/s"] / 3600
                print(f"    {args.project_epochs} epochs of {args.epoch_images} images: {hours:.1f} h "
                      "of training steps (kNN monitor and data loading not included)", flush=True)

    baseline = rows[0]
    print(f"ratios to {baseline['precision']} {baseline['memory format']} (images/s):")
    for row in rows[1:]:
        print(f"  {row['precision']} {row['memory format']}: {row['images/s'] / baseline['images/s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
