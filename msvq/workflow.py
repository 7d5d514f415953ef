"""Per-stage parameter keys, msvq source files and command lines of the pipeline.

Snakemake (Snakefile, workflow/rules/) builds its rules from these functions. DVC's
dvc.yaml is static YAML, so it spells out the same lists, and tests/test_workflow.py
checks that the two agree.

Both engines track parameters by key path in the params file. DVC fails on a tracked
key that the file does not contain, so the workflow requires every listed dataset and
method to carry all five override sections (``{}`` where nothing is overridden);
:func:`check_tracked_keys` reports the missing ones before any stage runs.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from typing import Any

from msvq.config import SECTIONS, Params, ParamsError

PACKAGE_DIR = Path(__file__).resolve().parent
RESULTS = "results"
# Per-run outputs live under RUNS so the report can depend on that one directory in
# dvc.yaml (DVC cannot loop over runs in a single stage's deps), while the report
# writes figures/ and table.* beside it.
RUNS = f"{RESULTS}/runs"
RANDOM_METHOD = "random"
SCHEMA_FILE = "workflow/schemas/params.schema.yaml"
PAPER_FILE = "config/paper_results.yaml"

# Shared keys and override sections per stage. An override section is tracked for the
# stage's dataset (and method, where the stage has one) as overrides.<scope>.<name>.<section>.
STAGE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "download": (("data.root", "data.mirrors"), ()),
    "prepare": (("data.root",), ()),
    "pretrain": (("data", "model", "pretrain", "method"), ("data", "model", "pretrain", "method")),
    # linear-eval reads pretrain.device and pretrain.precision to place the backbone.
    "linear": (
        ("data", "model", "pretrain.device", "pretrain.precision", "linear"),
        ("data", "model", "pretrain", "linear"),
    ),
    # The report merges every run's overrides to find data roots, seeds and crops.
    "report": (("datasets", "methods", "data", "pretrain.seed", "report", "overrides"), ()),
}

# The module each command runs; its msvq import closure is the stage's code dependency.
STAGE_MODULES = {
    "download": "msvq/data/download.py",
    "prepare": "msvq/data/prepare.py",
    "pretrain": "msvq/pretrain.py",
    "linear": "msvq/linear.py",
    "report": "msvq/report/__init__.py",
}


def lookup(raw: dict[str, Any], key: str) -> Any:
    """Return the value at dotted ``key`` in ``raw``; raise KeyError naming the key."""
    value: Any = raw
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def tracked_keys(stage: str, dataset: str | None = None, method: str | None = None) -> list[str]:
    """Return the params-file key paths that ``stage`` reads for one dataset and method."""
    shared, sections = STAGE_KEYS[stage]
    keys = list(shared)
    scopes = []
    if dataset is not None:
        scopes.append(("datasets", dataset))
    if method is not None and method != RANDOM_METHOD:
        scopes.append(("methods", method))
    for scope, name in scopes:
        keys += [f"overrides.{scope}.{name}.{section}" for section in sections]
    return keys


def sorted_value(value: Any) -> Any:
    """Return ``value`` with every mapping's keys sorted, so its repr is stable."""
    if isinstance(value, dict):
        return {key: sorted_value(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [sorted_value(item) for item in value]
    return value


def stage_params(raw: dict[str, Any], stage: str, dataset: str | None = None,
                 method: str | None = None) -> dict[str, Any]:
    """Return ``{key path: value}`` for the keys ``stage`` reads, in a stable order."""
    return {key: sorted_value(lookup(raw, key)) for key in tracked_keys(stage, dataset, method)}


def check_tracked_keys(raw: dict[str, Any], source: str | Path) -> None:
    """Raise ParamsError listing tracked override sections missing from ``raw``."""
    overrides = raw.get("overrides") or {}
    missing = []
    for scope, names in (("datasets", raw["datasets"]), ("methods", raw["methods"])):
        for name in names:
            block = (overrides.get(scope) or {}).get(name)
            for section in SECTIONS:
                if not isinstance(block, dict) or section not in block:
                    missing.append(f"overrides.{scope}.{name}.{section}")
    if missing:
        lines = "\n".join(f"  - {key}" for key in missing)
        raise ParamsError(
            f"{source} lacks override sections that Snakemake and DVC track per stage:\n{lines}\n"
            "Every listed dataset and method needs all five sections (data, model, pretrain, "
            "method, linear); write `{}` for a section with no overrides."
        )


def module_path(name: str) -> Path | None:
    """Return the file of msvq module ``name`` (a package's __init__.py), or None."""
    parts = name.split(".")
    if parts[0] != "msvq":
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Return the absolute names of the modules ``path`` imports, at any nesting level."""
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            # `from package import module` imports the submodule as well.
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def import_closure(start: str) -> list[str]:
    """Return the msvq source files that running ``start`` imports, as sorted repo paths.

    Importing ``msvq.a.b`` runs ``msvq/__init__.py`` and ``msvq/a/__init__.py`` too, so
    parent packages are included.
    """
    root = PACKAGE_DIR.parent
    pending, seen = [root / start], set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                found = module_path(".".join(parts[:depth]))
                if found is not None and found not in seen:
                    pending.append(found)
    return sorted(str(path.relative_to(root)) for path in seen)


def stage_sources(stage: str) -> list[str]:
    """Return the repo files ``stage``'s command depends on: msvq sources and the schema.

    msvq/cli.py is left out on purpose: it only parses arguments, and listing it would
    rerun every stage after an edit to one command's help text.
    """
    return [*import_closure(STAGE_MODULES[stage]), SCHEMA_FILE]


def source_digest(stage: str) -> str:
    """Return a SHA-256 hex digest of the names and contents of ``stage``'s source files."""
    root = PACKAGE_DIR.parent
    digest = hashlib.sha256()
    for name in stage_sources(stage):
        digest.update(name.encode() + b"\0")
        digest.update((root / name).read_bytes())
    return digest.hexdigest()


def stage_processes(params: Params, stage: str, dataset: str, method: str) -> int:
    """Return the processes, one per GPU, that ``stage`` starts for one run: pretrain.nproc or linear.nproc."""
    run = params.run(dataset, method)
    if stage == "pretrain":
        return run.pretrain.nproc
    if stage == "linear":
        return run.linear.nproc
    raise ValueError(f"stage {stage!r} runs in one process; only pretrain and linear take nproc")


def stage_command(stage: str, params_file: str, dataset: str | None = None,
                  method: str | None = None) -> list[str]:
    """Return the msvq command line of one stage, the same for both engines."""
    if stage in ("download", "prepare"):
        return ["msvq", stage, dataset, "--params", params_file]
    if stage == "pretrain":
        return ["msvq", "pretrain", "--dataset", dataset, "--method", method, "--params", params_file,
                "--out", f"{RUNS}/{dataset}/{method}/pretrain"]
    if stage == "linear":
        checkpoint = (RANDOM_METHOD if method == RANDOM_METHOD
                      else f"{RUNS}/{dataset}/{method}/pretrain/checkpoint.pt")
        return ["msvq", "linear-eval", "--dataset", dataset, "--method", method, "--params", params_file,
                "--checkpoint", checkpoint, "--out", f"{RUNS}/{dataset}/{method}/linear"]
    if stage == "report":
        return ["msvq", "report", "--params", params_file, "--results", RUNS, "--out", RESULTS,
                "--paper", PAPER_FILE]
    raise ValueError(f"unknown stage {stage!r}")
