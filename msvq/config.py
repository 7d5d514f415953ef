"""Load, merge and validate the params file, and return typed run settings.

One params file (config/params.yaml) drives every stage. Shared sections are
merged with ``overrides.datasets.<dataset>`` and then ``overrides.methods.<method>``
to give the settings of one run. The JSON schema in workflow/schemas rejects
unknown keys and out-of-range values; the checks that involve two keys run here,
on each merged run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "params.schema.yaml"
SECTIONS = ("data", "model", "pretrain", "method", "linear")
# Keys that set how a run executes without changing its result; RunParams.digest skips them.
EXECUTION_KEYS = ("nproc", "compile")


class ParamsError(ValueError):
    """An invalid, unknown or missing parameter; the message names the key path."""


@dataclass(frozen=True)
class DataParams:
    root: str
    mirrors: tuple[str, ...]
    crop: int
    train_subset: int | None


@dataclass(frozen=True)
class ModelParams:
    width: int
    bn_splits: int
    proj_hidden: int
    proj_dim: int


@dataclass(frozen=True)
class PretrainParams:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    warmup_epochs: int
    seed: int
    device: str
    precision: str
    channels_last: bool
    shuffle_bn: bool
    knn_every: int
    knn_k: int
    knn_t: float
    nproc: int
    compile: bool


@dataclass(frozen=True)
class MethodParams:
    m1: float
    m2: float
    tau_s: float
    tau_t: float
    queue_size: int


@dataclass(frozen=True)
class LinearParams:
    mode: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    seed: int
    nproc: int


SECTION_TYPES = {
    "data": DataParams,
    "model": ModelParams,
    "pretrain": PretrainParams,
    "method": MethodParams,
    "linear": LinearParams,
}


@dataclass(frozen=True)
class RunParams:
    """The merged settings of one (dataset, method) run."""

    dataset: str
    method_name: str
    data: DataParams
    model: ModelParams
    pretrain: PretrainParams
    method: MethodParams
    linear: LinearParams

    def sections(self, *names: str) -> dict[str, dict[str, Any]]:
        """Return the named sections as plain dicts, in the order given."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in names}

    def digest(self, *names: str) -> str:
        """Return a SHA-256 hex digest of the named sections, stable across runs.

        The process counts (``nproc``) and ``pretrain.compile`` are left out. They change
        how the same computation runs, not its result, so a run may resume with another
        number of processes or with compilation switched.
        """
        sections = self.sections(*names)
        for values in sections.values():
            for key in EXECUTION_KEYS:
                values.pop(key, None)
        payload = {"dataset": self.dataset, "method": self.method_name, **sections}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Params:
    """A validated params file: the run lists plus the raw merged-ready mapping."""

    path: Path
    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    raw: dict[str, Any]

    def run(self, dataset: str, method: str) -> RunParams:
        """Merge the overrides for ``dataset`` and ``method`` and check the result."""
        merged = merged_sections(self.raw, dataset, method)
        typed = {}
        for name in SECTIONS:
            values = dict(merged[name])
            if name == "data":
                values["mirrors"] = tuple(values["mirrors"])
            typed[name] = SECTION_TYPES[name](**values)
        run = RunParams(dataset=dataset, method_name=method, **typed)
        check_run(run, self.path)
        return run

    def runs(self) -> list[RunParams]:
        return [self.run(d, m) for d in self.datasets for m in self.methods]


def load_schema() -> dict[str, Any]:
    if not SCHEMA_PATH.is_file():
        raise FileNotFoundError(
            f"params schema not found at {SCHEMA_PATH}; msvq must run from its source "
            "checkout (pip install -e .)"
        )
    with SCHEMA_PATH.open() as handle:
        return yaml.safe_load(handle)


def key_path(parts) -> str:
    return ".".join(str(part) for part in parts) or "<top level>"


def describe_error(error: jsonschema.ValidationError) -> str:
    """Turn a jsonschema error into 'key path = value: what is allowed'."""
    path = key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        where = path if error.absolute_path else ""
        keys = ", ".join(f"{where}.{key}".lstrip(".") for key in unknown)
        return f"unknown key {keys}; allowed keys here: {', '.join(allowed)}"
    if error.validator == "required":
        return f"{path}: {error.message}"
    if error.validator == "propertyNames":
        return f"{path}: unknown name {error.instance!r}; {error.message}"
    description = error.schema.get("description")
    suffix = f" ({description})" if description else ""
    return f"{path} = {error.instance!r} is invalid: {error.message}{suffix}"


def validate(raw: Any, source: Path | str) -> None:
    """Raise ParamsError listing every schema violation of ``raw``."""
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = "\n".join(f"  - {describe_error(error)}" for error in errors)
        raise ParamsError(f"invalid parameters in {source}:\n{lines}")


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def merged_sections(raw: dict[str, Any], dataset: str, method: str) -> dict[str, Any]:
    """Apply the dataset override, then the method override, to the shared sections."""
    merged = {name: raw[name] for name in SECTIONS}
    overrides = raw.get("overrides") or {}
    for scope, name in (("datasets", dataset), ("methods", method)):
        block = (overrides.get(scope) or {}).get(name) or {}
        merged = deep_merge(merged, block)
    return merged


def check_run(run: RunParams, source: Path | str) -> None:
    """Check the rules that span two keys, on the merged settings of one run."""
    where = f"{source} (dataset {run.dataset}, method {run.method_name})"
    pre, problems = run.pretrain, []
    if pre.batch_size % run.model.bn_splits:
        problems.append(
            f"pretrain.batch_size = {pre.batch_size} must be divisible by "
            f"model.bn_splits = {run.model.bn_splits}"
        )
    if run.method.queue_size % pre.batch_size:
        problems.append(
            f"method.queue_size = {run.method.queue_size} must be a positive multiple of "
            f"pretrain.batch_size = {pre.batch_size}"
        )
    if pre.warmup_epochs >= pre.epochs:
        problems.append(
            f"pretrain.warmup_epochs = {pre.warmup_epochs} must be less than "
            f"pretrain.epochs = {pre.epochs}"
        )
    if run.data.train_subset is not None and run.data.train_subset < pre.batch_size:
        problems.append(
            f"data.train_subset = {run.data.train_subset} must be at least "
            f"pretrain.batch_size = {pre.batch_size} (batches drop the remainder)"
        )
    # Each of nproc processes takes an equal share of the global batch and normalises
    # whole SplitBatchNorm groups of batch_size / bn_splits samples.
    if pre.batch_size % pre.nproc:
        problems.append(f"pretrain.batch_size = {pre.batch_size} must be divisible by pretrain.nproc = {pre.nproc}")
    if run.model.bn_splits % pre.nproc:
        problems.append(f"model.bn_splits = {run.model.bn_splits} must be divisible by pretrain.nproc = {pre.nproc}")
    if run.linear.batch_size % run.linear.nproc:
        problems.append(
            f"linear.batch_size = {run.linear.batch_size} must be divisible by linear.nproc = {run.linear.nproc}"
        )
    if problems:
        lines = "\n".join(f"  - {problem}" for problem in problems)
        raise ParamsError(f"invalid parameters in {where}:\n{lines}")


def load_params(path: str | Path) -> Params:
    """Read, validate and check every run of a params file."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        with path.open() as handle:
            raw = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {error}") from error
    validate(raw, path)
    params = Params(path=path, datasets=tuple(raw["datasets"]), methods=tuple(raw["methods"]), raw=raw)
    for dataset in params.datasets:
        for method in params.methods:
            params.run(dataset, method)
    return params
