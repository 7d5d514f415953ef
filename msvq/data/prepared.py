"""Read a prepared dataset: memory-mapped uint8 arrays plus meta.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msvq.data.prepare import FORMAT_VERSION


@dataclass(frozen=True)
class PreparedDataset:
    path: Path
    meta: dict

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def mean(self) -> list[float]:
        return list(self.meta["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.meta["std"])

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"][0])

    def has_split(self, split: str) -> bool:
        return split in self.meta["splits"]

    def images(self, split: str) -> np.ndarray:
        """Return the split's images as a read-only memory map (N, H, W, C)."""
        return np.load(self.path / f"{split}_images.npy", mmap_mode="r")

    def labels(self, split: str) -> np.ndarray:
        return np.load(self.path / f"{split}_labels.npy")


def open_prepared(root: str | Path, dataset: str) -> PreparedDataset:
    """Open ROOT/prepared/<dataset>/, with a clear error when it is missing or stale."""
    path = Path(root) / "prepared" / dataset
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"prepared dataset not found: {meta_path}. Run `msvq download {dataset}` "
            f"and `msvq prepare {dataset}` first."
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise FileNotFoundError(
            f"{meta_path} has format version {meta.get('format_version')}, this msvq reads "
            f"{FORMAT_VERSION}. Run `msvq prepare {dataset} --force`."
        )
    return PreparedDataset(path=path, meta=meta)
