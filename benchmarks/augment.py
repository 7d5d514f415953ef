"""Views per second of msvq's batched augmentation against torchvision's per-image PIL pipeline.

    python benchmarks/augment.py                 # CIFAR shapes: 32 px images, 32 px views
    python benchmarks/augment.py --image 96 --crop 64 --batch 256

Both make the student's strong view with the same settings: RandomResizedCrop (scale
0.2-1), horizontal flip (p 0.5), ColorJitter(0.4, 0.4, 0.4, 0.1) (p 0.8), grayscale
(p 0.2), Gaussian blur (sigma 0.1-2, p 0.5), then ToTensor and Normalize. The PIL
pipeline works image by image, as the original MSVQ code's dataset class does; msvq's
works on the whole uint8 batch at once. Each is measured with one thread and with all
threads, in one run, and the ratios come first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.hardware import describe_hardware  # noqa: E402
from msvq.augment import blur_kernel_size, strong_view  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=int, default=32, help="stored image size in pixels")
    parser.add_argument("--crop", type=int, default=32, help="view size in pixels")
    parser.add_argument("--batch", type=int, default=256, help="images per batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per variant (median reported)")
    return parser.parse_args(argv)


def pil_pipeline(crop: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(crop, scale=(0.2, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([transforms.GaussianBlur(blur_kernel_size(crop), sigma=(0.1, 2.0))], p=0.5),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def median_seconds(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (args.batch, args.image, args.image, 3), dtype=np.uint8)
    batch = torch.from_numpy(array)
    pil_images = [Image.fromarray(image) for image in array]
    pipeline = pil_pipeline(args.crop)
    generator = torch.Generator().manual_seed(0)

    def batched():
        strong_view(batch, args.crop, MEAN, STD, generator=generator)

    def per_image():
        torch.stack([pipeline(image) for image in pil_images])

    all_threads = torch.get_num_threads()
    print(describe_hardware(torch.device("cpu")))
    print(f"strong view, {args.image} px images to {args.crop} px views, batch {args.batch}, "
          f"median of {args.repeats} batches")
    results = {}
    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        results[threads] = {
            "batched": args.batch / median_seconds(batched, args.repeats),
            "PIL": args.batch / median_seconds(per_image, args.repeats),
        }
    torch.set_num_threads(all_threads)

    for threads, row in results.items():
        print(f"  {threads} thread(s): batched / PIL = {row['batched'] / row['PIL']:.1f}x")
    for threads, row in results.items():
        print(f"  {threads} thread(s): batched {row['batched']:.0f} views/s, PIL {row['PIL']:.0f} views/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
