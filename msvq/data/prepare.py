"""Turn verified raw files into memory-mappable arrays under ROOT/prepared/<dataset>/.

Layout of a prepared dataset:
    <split>_images.npy   uint8 (N, H, W, C)
    <split>_labels.npy   int64 (N,), -1 for unlabeled images
    meta.json            class names, image shape, channels, split sizes,
                         per-channel mean/std of the train split, raw-file MD5s

The arrays are built in ROOT/.staging/ and the finished directory is renamed into
place, so ROOT/prepared/ never contains a half-written dataset.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from msvq.data.download import ChecksumError, verified_md5
from msvq.data.formats import READERS, ArchiveError, PreparedWriter
from msvq.data.registry import DatasetSpec
from msvq.io import fsync_dir, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class PrepareError(RuntimeError):
    """Raw files missing or not matching their checksums."""


def raw_checksums(spec: DatasetSpec, raw_dir: Path) -> dict[str, str]:
    """Return {file name: MD5} of the raw files, verifying each against the registry."""
    missing = [remote.name for remote in spec.files if not (raw_dir / remote.name).is_file()]
    if missing:
        raise PrepareError(
            f"raw file(s) missing in {raw_dir}: {', '.join(missing)}. Run `msvq download {spec.name}` first."
        )
    checksums = {}
    for remote in spec.files:
        try:
            checksums[remote.name] = verified_md5(raw_dir, remote)
        except ChecksumError as error:
            raise PrepareError(
                f"{error}. The file is corrupt or incomplete: delete it and run `msvq download {spec.name}`."
            ) from error
    return checksums


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Return the per-channel mean and std of uint8 images, in [0, 1] units."""
    channels = images.shape[-1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].reshape(-1, channels).astype(np.float64) / 255.0
        total += block.sum(axis=0)
        squares += (block**2).sum(axis=0)
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return mean.tolist(), std.tolist()


def check_counts(spec: DatasetSpec, splits: dict[str, int]) -> None:
    if spec.counts is not None and splits != spec.counts:
        raise ArchiveError(f"{spec.name}: split sizes {splits} differ from the expected {spec.counts}")


def build(spec: DatasetSpec, raw_dir: Path, staging: Path, checksums: dict[str, str]) -> dict:
    writer = PreparedWriter(staging)
    classes = READERS[spec.reader](raw_dir, writer)
    check_counts(spec, writer.splits)

    for split in writer.splits:
        labels = np.load(staging / f"{split}_labels.npy")
        labelled = labels[labels >= 0]
        if labelled.size and labelled.max() >= len(classes):
            raise ArchiveError(f"{spec.name} {split}: label {labelled.max()} but only {len(classes)} class names")

    train = np.load(staging / "train_images.npy", mmap_mode="r")
    mean, std = channel_stats(train)
    height, width, channels = writer.shape
    return {
        "format_version": FORMAT_VERSION,
        "dataset": spec.name,
        "classes": classes,
        "num_classes": len(classes),
        "image_size": [height, width],
        "channels": channels,
        "splits": dict(writer.splits),
        "mean": mean,
        "std": std,
        "raw_files": checksums,
    }


def prepare(spec: DatasetSpec, root: str | Path, force: bool = False) -> Path:
    """Prepare ``spec`` from ROOT/raw/<name>/ into ROOT/prepared/<name>/ and return that path."""
    root = Path(root)
    raw_dir = root / "raw" / spec.name
    target = root / "prepared" / spec.name
    checksums = raw_checksums(spec, raw_dir)

    meta_path = target / "meta.json"
    if not force and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("raw_files") == checksums and meta.get("format_version") == FORMAT_VERSION:
            log.info("%s: already prepared in %s from the same raw files; nothing to do", spec.name, target)
            return target
        log.info("%s: raw files or format changed since the last prepare; rebuilding %s", spec.name, target)

    staging_root = root / ".staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{spec.name}.", dir=staging_root))
    try:
        log.info("%s: reading %s", spec.name, raw_dir)
        meta = build(spec, raw_dir, staging, checksums)
        write_json(staging / "meta.json", meta)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            old = staging_root / f"{spec.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            shutil.rmtree(old)
        staging.rename(target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging_root.rmdir()
        except OSError:
            pass

    splits = ", ".join(f"{name} {count}" for name, count in meta["splits"].items())
    log.info("%s: prepared %s (%s; %d classes)", spec.name, target, splits, meta["num_classes"])
    return target
