"""Read the inputs of the report: each run's metrics.json and knn.csv, and the published numbers.

The published numbers are those of Peng, Long and Li, "Self-Supervised Learning with
Multiple Sample Views and Queues" (arXiv 2305.05370), kept in config/paper_results.yaml.

A missing file is not an error (the reader returns None). A file that exists but
cannot be parsed, or lacks a required value, raises ReportError naming the file.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from msvq.data import DATASETS
from msvq.methods import METHODS

# The random-initialisation baseline has a linear/ directory but no pretrain/ directory.
RANDOM_METHOD = "random"


class ReportError(ValueError):
    """A corrupt or invalid input of the report; the message names the file."""


@dataclass(frozen=True)
class RunResult:
    """The numbers of one (dataset, method) run; None where the run or the value is missing."""

    linear_top1: float | None = None
    knn_top1: float | None = None
    knn_curve: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class PaperResults:
    """Top-1 values (%) published for MSVQ and its baselines, keyed by (method, dataset)."""

    source: str
    linear_top1: dict[tuple[str, str], float]
    knn_top1: dict[tuple[str, str], float]
    knn_epoch: int
    knn_approximate: bool


def pretrain_dir(results_dir: Path, dataset: str, method: str) -> Path:
    return results_dir / dataset / method / "pretrain"


def linear_dir(results_dir: Path, dataset: str, method: str) -> Path:
    return results_dir / dataset / method / "linear"


def read_run(results_dir: Path, dataset: str, method: str) -> RunResult:
    """Read the linear top-1, the final kNN top-1 and the kNN curve of one run."""
    linear = read_metric(linear_dir(results_dir, dataset, method) / "metrics.json", "top1", nullable=False)
    if method == RANDOM_METHOD:
        return RunResult(linear_top1=linear)

    pretrain = pretrain_dir(results_dir, dataset, method)
    knn = read_metric(pretrain / "metrics.json", "knn_top1", nullable=True)
    curve = read_knn_curve(pretrain / "knn.csv") or []
    return RunResult(linear_top1=linear, knn_top1=knn, knn_curve=curve)


def read_metric(path: Path, key: str, nullable: bool) -> float | None:
    """Return metrics[key] from the JSON object in ``path``, or None when the file is missing.

    Raises ReportError when the file is not a JSON object, lacks ``key``, or has a value
    that is not a finite number (null is accepted when ``nullable``).
    """
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportError(f"{path} is not valid JSON ({error}); rerun the stage that writes it") from error
    if not isinstance(metrics, dict):
        raise ReportError(f"{path} must contain a JSON object, found {type(metrics).__name__}")
    if key not in metrics:
        raise ReportError(f"{path} has no key {key!r} (keys: {', '.join(sorted(metrics))})")

    value = metrics[key]
    if value is None and nullable:
        return None
    if not is_number(value):
        raise ReportError(f"{path}: {key} = {value!r} is invalid, expected a finite number")
    return float(value)


def read_knn_curve(path: Path) -> list[tuple[int, float]] | None:
    """Return the (epoch, kNN top-1) pairs of a knn.csv, or None when the file is missing.

    Epochs without a kNN pass have an empty knn_top1 cell and are left out.
    """
    if not path.is_file():
        return None
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
        raise ReportError(f"{path} is not a readable CSV file ({error}); rerun the pretraining stage") from error
    if header is None or not {"epoch", "knn_top1"} <= set(header):
        raise ReportError(f"{path} must have the header 'epoch,knn_top1', found {header}")

    curve = []
    for line, row in enumerate(rows, start=2):
        if row["knn_top1"] == "":
            continue
        try:
            point = (int(row["epoch"]), float(row["knn_top1"]))
        except (TypeError, ValueError) as error:
            raise ReportError(
                f"{path} line {line}: epoch {row['epoch']!r}, knn_top1 {row['knn_top1']!r} is invalid, "
                "expected an integer epoch and a number"
            ) from error
        if not math.isfinite(point[1]):
            raise ReportError(f"{path} line {line}: knn_top1 {row['knn_top1']!r} is not a finite number")
        curve.append(point)
    return curve


def load_paper_results(path: str | Path) -> PaperResults:
    """Load and check the published numbers from a YAML file such as config/paper_results.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"paper results file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ReportError(f"{path} is not valid YAML: {error}") from error

    if not isinstance(raw, dict):
        raise ReportError(f"{path} must contain a mapping with keys source, linear_top1, knn_top1")
    check_keys(path, "<top level>", raw, required={"source", "linear_top1", "knn_top1"})
    knn = raw["knn_top1"]
    if not isinstance(knn, dict):
        raise ReportError(f"{path}: knn_top1 must be a mapping with keys epoch, approximate, values")
    check_keys(path, "knn_top1", knn, required={"epoch", "approximate", "values"})
    if not isinstance(knn["epoch"], int) or isinstance(knn["epoch"], bool) or knn["epoch"] < 1:
        raise ReportError(f"{path}: knn_top1.epoch = {knn['epoch']!r} is invalid, expected a positive integer")
    if not isinstance(knn["approximate"], bool):
        raise ReportError(f"{path}: knn_top1.approximate = {knn['approximate']!r} is invalid, expected true or false")

    return PaperResults(
        source=str(raw["source"]),
        linear_top1=method_dataset_table(path, "linear_top1", raw["linear_top1"]),
        knn_top1=method_dataset_table(path, "knn_top1.values", knn["values"]),
        knn_epoch=knn["epoch"],
        knn_approximate=knn["approximate"],
    )


def check_keys(path: Path, where: str, mapping: dict[str, Any], required: set[str]) -> None:
    missing = required - set(mapping)
    unknown = set(mapping) - required
    if missing or unknown:
        raise ReportError(
            f"{path}: {where} must have exactly the keys {', '.join(sorted(required))} "
            f"(missing: {', '.join(sorted(missing)) or 'none'}; unknown: {', '.join(sorted(unknown)) or 'none'})"
        )


def method_dataset_table(path: Path, where: str, table: Any) -> dict[tuple[str, str], float]:
    """Check a {method: {dataset: number}} mapping and flatten it to {(method, dataset): number}."""
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise ReportError(f"{path}: {where} must map method names to {{dataset: top-1}} mappings")
    known_methods = set(METHODS) | {RANDOM_METHOD}
    flat = {}
    for method, row in table.items():
        if method not in known_methods:
            raise ReportError(
                f"{path}: {where}.{method} is an unknown method; known methods: {', '.join(sorted(known_methods))}"
            )
        if not isinstance(row, dict):
            raise ReportError(f"{path}: {where}.{method} must map dataset names to top-1 values")
        for dataset, value in row.items():
            if dataset not in DATASETS:
                raise ReportError(
                    f"{path}: {where}.{method}.{dataset} is an unknown dataset; "
                    f"known datasets: {', '.join(sorted(DATASETS))}"
                )
            if not is_number(value) or not 0 <= value <= 100:
                raise ReportError(
                    f"{path}: {where}.{method}.{dataset} = {value!r} is invalid, expected a top-1 in percent (0-100)"
                )
            flat[(method, dataset)] = float(value)
    return flat


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
