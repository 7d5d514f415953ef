"""Copies of the project for the Snakemake and DVC end-to-end tests, and their runners.

Each engine runs in its own copy of the repository (a git repository, as DVC needs),
on tiny Fashion-MNIST and CIFAR-10 archives served from a mirror directory. The
`msvq` processes the engines start accept those archives through
tests/registry_hook/sitecustomize.py.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from msvq.config import SECTIONS
from tests import archives
from tests.tiny import REPO, tiny_params

BIN = Path(sys.executable).parent
HOOK_DIR = REPO / "tests" / "registry_hook"
ENGINE_TIMEOUT_S = 900
LOCAL_RUN_RECORDS = {"dvc.lock"}


def make_mirror(directory: Path) -> Path:
    """Write tiny Fashion-MNIST and CIFAR-10 archives and return the registry file."""
    archives.make_fashionmnist(directory, n_train=256, n_test=64)
    archives.make_cifar10(directory, per_batch=48)
    registry = {}
    for name, files in {
        "fashionmnist": [
            "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
        ],
        "cifar10": ["cifar-10-python.tar.gz"],
    }.items():
        registry[name] = {"files": {file: archives.md5_of(directory / file) for file in files}}
    path = directory / "registry.json"
    path.write_text(json.dumps(registry))
    return path


def workflow_params(mirror: Path, datasets=("fashionmnist", "cifar10"), methods=("msvq",)) -> dict:
    """The tiny params of a whole pipeline run: 2 epochs, width 4, features-mode linear eval."""
    raw = tiny_params(Path("data"), epochs=2, knn_every=1)
    raw["datasets"], raw["methods"] = list(datasets), list(methods)
    raw["data"]["mirrors"] = [str(mirror)]
    raw["linear"].update(mode="features", epochs=2)
    raw["report"] = {"tsne_points": 32, "tsne_perplexity": 5}
    empty = {section: {} for section in SECTIONS}
    raw["overrides"] = {
        "datasets": {name: copy.deepcopy(empty) for name in datasets},
        "methods": {name: copy.deepcopy(empty) for name in methods},
    }
    if "mocov2" in methods:
        raw["overrides"]["methods"]["mocov2"]["method"] = {"tau_s": 0.2}
    return raw


def copy_project(dest: Path) -> Path:
    """Copy the repository's tracked and unignored files to ``dest`` and commit them there."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        # A dvc.lock from the user's own runs would make the copy's DVC skip stages.
        if source.is_file() and name not in LOCAL_RUN_RECORDS:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    git = ["git", "-c", "user.name=msvq tests", "-c", "user.email=tests@localhost"]
    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "project copy"], cwd=dest, check=True)
    return dest


def engine_env(registry: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HOOK_DIR), env.get("PYTHONPATH")]))
    env["MSVQ_TEST_REGISTRY"] = str(registry)
    env.pop("MSVQ_DATA_MIRROR", None)
    # Jobs may run side by side on few cores; one torch thread each avoids contention.
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return env


@dataclass
class Project:
    """One engine's copy of the project; ``run`` returns the stages that ran, by DVC name."""

    engine: str
    path: Path
    env: dict[str, str]
    last_output: str = field(default="")
    returncode: int = 0

    @property
    def params_file(self) -> Path:
        return self.path / "config" / "params.yaml"

    def write_params(self, raw: dict) -> None:
        self.params_file.write_text(yaml.safe_dump(raw, sort_keys=False))

    def read_params(self) -> dict:
        return yaml.safe_load(self.params_file.read_text())

    def command(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            list(args), cwd=self.path, env=self.env, capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S,
        )
        self.last_output = result.stdout + result.stderr
        self.returncode = result.returncode
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed with status {result.returncode}:\n{self.last_output[-6000:]}")
        return result

    def run(self, *extra: str, check: bool = True) -> set[str]:
        if self.engine == "snakemake":
            # 8 cores let two 4-thread GPU jobs fit, so only gpu=1 keeps them apart.
            self.command(str(BIN / "snakemake"), "--cores", "8", "--resources", "gpu=1", *extra, check=check)
            return snakemake_jobs(self.last_output)
        self.command(str(BIN / "dvc"), "repro", *extra, check=check)
        return set(re.findall(r"Running stage '([^']+)'", self.last_output))


JOB_START = re.compile(r"^\s*(?:local)?rule (\w+):\s*$")
WILDCARDS = re.compile(r"^\s*wildcards: (.*)$")


def dvc_name(rule: str, wildcards: dict[str, str]) -> str:
    """Name a Snakemake job as DVC names the same stage (pretrain@cifar10-msvq)."""
    if not wildcards:
        return rule
    return f"{rule}@" + "-".join(wildcards[key] for key in ("dataset", "method") if key in wildcards)


def snakemake_jobs(output: str) -> set[str]:
    """Return the jobs Snakemake's log output announces, by DVC stage name, without `all`."""
    jobs, rule, wildcards = set(), None, {}

    def close() -> None:
        if rule is not None and rule != "all":
            jobs.add(dvc_name(rule, wildcards))

    for line in output.splitlines():
        start = JOB_START.match(line)
        if start:
            close()
            rule, wildcards = start.group(1), {}
            continue
        found = WILDCARDS.match(line)
        if found and rule is not None:
            wildcards = dict(part.split("=", 1) for part in found.group(1).split(", "))
    close()
    return jobs


def snakemake_records(project: Path) -> dict[str, dict]:
    """Return Snakemake's metadata records by output file (.snakemake/metadata)."""
    records = {}
    for path in (project / ".snakemake" / "metadata").iterdir():
        name = base64.urlsafe_b64decode(path.name + "=" * (-len(path.name) % 4)).decode()
        records[name] = json.loads(path.read_text())
    return records
