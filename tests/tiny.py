"""Tiny datasets and params files shared by the end-to-end tests."""

import csv
import dataclasses
import subprocess
import time
from pathlib import Path

import yaml

from msvq.data import download, get_spec, prepare
from msvq.data.registry import RemoteFile
from tests import archives

REPO = Path(__file__).resolve().parent.parent


def tiny_spec(name: str, directory: Path, url_base: str | None = None, counts: dict | None = None):
    """The registry spec of ``name`` with the digests of the tiny files in ``directory``."""
    official = get_spec(name)
    files = tuple(
        RemoteFile(
            name=remote.name,
            md5=archives.md5_of(directory / remote.name),
            urls=(url_base + remote.name,) if url_base else ("http://127.0.0.1:9/" + remote.name,),
        )
        for remote in official.files
    )
    return dataclasses.replace(official, files=files, counts=counts, mirrors=())


def tiny_params(root: Path, **pretrain_changes) -> dict:
    """The demo params shrunk to seconds: width 4, 16 px crops, batch 32, 3 epochs, fp32 on CPU."""
    raw = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    raw["datasets"] = ["fashionmnist"]
    raw["methods"] = ["msvq", "mocov2"]
    raw["data"].update(root=str(root), crop=16, train_subset=None)
    raw["model"].update(width=4, bn_splits=2, proj_hidden=32, proj_dim=16)
    raw["pretrain"].update(
        epochs=3, batch_size=32, warmup_epochs=1, device="cpu", precision="fp32", knn_every=1, knn_k=10,
        channels_last=False,
    )
    raw["pretrain"].update(pretrain_changes)
    raw["method"].update(queue_size=64)
    raw["overrides"] = {"methods": {"mocov2": {"method": {"tau_s": 0.2}}}}
    return raw


def write_params(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def make_tiny_root(base: Path, n_train: int = 256, n_test: int = 64) -> Path:
    """Prepare a Fashion-MNIST-format dataset of random images under BASE/data."""
    mirror = base / "mirror"
    archives.make_fashionmnist(mirror, n_train=n_train, n_test=n_test)
    spec = tiny_spec("fashionmnist", mirror)
    root = base / "data"
    download(spec, root, extra_mirrors=[str(mirror)])
    prepare(spec, root)
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def wait_for_first_epoch(process: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    """Wait until ``process`` has logged an epoch to OUT/train_log.csv, exited, or ``timeout`` seconds passed."""
    log = out / "train_log.csv"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and len(read_rows(log)) >= 1:
            return
        time.sleep(0.005)
