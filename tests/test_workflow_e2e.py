"""The whole pipeline through real Snakemake and real DVC on tiny data.

Each engine runs in its own copy of the project. The tests in this module share those
copies and run in file order: the full runs first, then the comparison of the two
DAGs, then changes that must rerun only what depends on them, then bad parameters.
"""

from __future__ import annotations

import ast
import json
import shlex
from pathlib import Path

import pytest
import yaml

from tests.workflow_project import (
    BIN, Project, copy_project, engine_env, make_mirror, snakemake_records, workflow_params,
)

ENGINES = ["snakemake", "dvc"]
DATASETS = ("fashionmnist", "cifar10")
METHOD = "msvq"
GPU_RULES = {"pretrain", "linear_eval", "linear_eval_random"}

ALL_STAGES = {
    *(f"download@{d}" for d in DATASETS),
    *(f"prepare@{d}" for d in DATASETS),
    *(f"pretrain@{d}-{METHOD}" for d in DATASETS),
    *(f"linear_eval@{d}-{METHOD}" for d in DATASETS),
    *(f"linear_eval_random@{d}" for d in DATASETS),
    "report",
}
LINEAR_AND_REPORT = {
    *(f"linear_eval@{d}-{METHOD}" for d in DATASETS),
    *(f"linear_eval_random@{d}" for d in DATASETS),
    "report",
}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("mirror")
    return directory, make_mirror(directory)


@pytest.fixture(scope="module")
def projects(tmp_path_factory, mirror) -> dict[str, Project]:
    """Both engines' project copies after a full run, created on first use."""
    built: dict[str, Project] = {}

    class Lazy(dict):
        def __missing__(self, engine: str) -> Project:
            directory, registry = mirror
            path = copy_project(tmp_path_factory.mktemp(f"project-{engine}"))
            project = Project(engine, path, engine_env(registry))
            project.write_params(workflow_params(directory))
            if engine == "dvc":
                commit_params(project)
            project.full_run = project.run()
            self[engine] = project
            return project

    return Lazy(built)


def commit_params(project: Project) -> None:
    project.command("git", "add", "config/params.yaml")
    project.command("git", "-c", "user.name=msvq tests", "-c", "user.email=tests@localhost",
                    "commit", "-q", "-m", "tiny params")


def expected(project: Project, stages: set[str], params_changed: bool) -> set[str]:
    """DVC also reruns check_params, which tracks every key, when the params file changed."""
    if project.engine == "dvc" and params_changed:
        return stages | {"check_params"}
    return stages


def change_params(project: Project, edit) -> None:
    raw = project.read_params()
    edit(raw)
    project.write_params(raw)


@pytest.mark.parametrize("engine", ENGINES)
def test_full_run_builds_every_stage(projects, engine):
    project = projects[engine]
    assert project.full_run == expected(project, ALL_STAGES, params_changed=True)
    results = project.path / "results"
    for name in ("table.md", "table.csv", "figures/knn_fashionmnist.png", "figures/knn_cifar10.png",
                 "figures/tsne_fashionmnist_msvq.png", "figures/tsne_cifar10_msvq.png"):
        assert (results / name).is_file(), name
    for dataset in DATASETS:
        for method in (METHOD, "random"):
            metrics = json.loads((results / "runs" / dataset / method / "linear" / "metrics.json").read_text())
            assert 0 <= metrics["top1"] <= 100
    table = (results / "table.md").read_text()
    assert "| MSVQ |" in table
    assert "| Random init |" in table


def test_snakemake_gpu_jobs_run_one_at_a_time(projects):
    records = snakemake_records(projects["snakemake"].path)
    # Snakemake keeps one record per output file; the job is their common command.
    jobs: dict[str, list[float]] = {}
    for record in records.values():
        if record["rule"] in GPU_RULES:
            span = jobs.setdefault(record["shellcmd"], [record["starttime"], record["endtime"]])
            span[0], span[1] = min(span[0], record["starttime"]), max(span[1], record["endtime"])
    spans = sorted(jobs.values())
    assert len(spans) == 6
    for (_, end), (next_start, _) in zip(spans, spans[1:]):
        assert next_start >= end, f"GPU jobs overlapped: {spans}"


def test_snakemake_html_report_shows_figures(projects):
    project = projects["snakemake"]
    project.command(str(BIN / "snakemake"), "--report", "report.html")
    html = (project.path / "report.html").read_text(errors="replace")
    assert "knn_fashionmnist.png" in html
    assert "tsne_cifar10_msvq.png" in html
    # Only files wrapped in report() are added; every output is named in the job metadata.
    for name in ("table.csv", "knn_cifar10.png", "tsne_fashionmnist_msvq.png"):
        assert f"Adding {name}" in project.last_output


def test_dvc_shows_params_metrics_and_plots(projects):
    project = projects["dvc"]
    experiments = json.loads(project.command(str(BIN / "dvc"), "exp", "show", "--json").stdout)
    text = json.dumps(experiments)
    assert "linear.epochs" in text or '"epochs"' in text
    assert "results/runs/cifar10/msvq/linear/metrics.json" in text
    assert '"top1"' in text
    project.command(str(BIN / "dvc"), "plots", "show", "-o", "plots")
    html = (project.path / "plots" / "index.html").read_text()
    assert "kNN top-1 during pretraining" in html
    assert "linear evaluation, test accuracy" in html
    assert "tsne_fashionmnist_msvq.png" in html


def covering(path: str, candidates: set[str]) -> str:
    """Return the candidate equal to ``path`` or the directory that contains it."""
    for candidate in candidates:
        if path == candidate or path.startswith(candidate.rstrip("/") + "/"):
            return candidate
    raise AssertionError(f"{path} is in no DVC path of {sorted(candidates)}")


def snakemake_jobs_by_stage(project: Path, dvc_stages: dict[str, dict]) -> dict[str, dict]:
    """Group Snakemake's metadata into jobs and name each by the DVC stage with its outputs."""
    jobs: dict[tuple[str, str], dict] = {}
    for output, record in snakemake_records(project).items():
        job = jobs.setdefault((record["rule"], record["shellcmd"]), {**record, "outputs": set()})
        job["outputs"].add(output)
    named = {}
    for job in jobs.values():
        owners = {
            name for name, stage in dvc_stages.items()
            if any(output == out or output.startswith(out + "/") for out in stage["outs"] for output in job["outputs"])
        }
        assert len(owners) == 1, f"{job['rule']} outputs {sorted(job['outputs'])} match DVC stages {owners}"
        named[owners.pop()] = job
    return named


def dvc_lock_stages(project: Path) -> dict[str, dict]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {
        name: {
            "cmd": stage["cmd"],
            "deps": {dep["path"] for dep in stage.get("deps", [])},
            "outs": {out["path"] for out in stage.get("outs", [])},
            "params": stage.get("params", {}).get("config/params.yaml", {}),
        }
        for name, stage in lock.items()
    }


def test_engines_build_the_same_dag(projects):
    """Same stages, command lines, inputs, outputs and parameters, as each engine recorded them."""
    dvc_stages = dvc_lock_stages(projects["dvc"].path)
    assert set(dvc_stages) == ALL_STAGES | {"check_params"}
    jobs = snakemake_jobs_by_stage(projects["snakemake"].path, dvc_stages)
    assert set(jobs) == ALL_STAGES

    for name, job in sorted(jobs.items()):
        stage = dvc_stages[name]
        command = job["shellcmd"].split(" 2>&1 | tee ")[0]
        assert shlex.split(command) == shlex.split(stage["cmd"]), name

        outputs = {covering(output, stage["outs"]) for output in job["outputs"]}
        assert outputs == stage["outs"], name

        deps = stage["deps"] - {"results/params.checked"}
        inputs = {covering(path, deps) for path in job["input"]}
        assert inputs == deps, name

        (tracked,) = job["params"]
        assert ast.literal_eval(tracked) == stage["params"], name


@pytest.mark.parametrize("engine", ENGINES)
def test_no_change_reruns_nothing(projects, engine):
    assert projects[engine].run() == set()


@pytest.mark.parametrize("engine", ENGINES)
def test_linear_param_reruns_linear_eval_and_report(projects, engine):
    project = projects[engine]
    change_params(project, lambda raw: raw["linear"].update(epochs=3))
    assert project.run() == expected(project, LINEAR_AND_REPORT, params_changed=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_dataset_pretrain_param_reruns_its_chain(projects, engine):
    project = projects[engine]
    # nproc 2 makes the same stage command start two processes under torchrun.
    change_params(project, lambda raw: raw["overrides"]["datasets"]["cifar10"]["pretrain"].update(epochs=3, nproc=2))
    chain = {f"pretrain@cifar10-{METHOD}", f"linear_eval@cifar10-{METHOD}", "linear_eval_random@cifar10", "report"}
    assert project.run() == expected(project, chain, params_changed=True)
    metrics = json.loads((project.path / "results/runs/cifar10/msvq/pretrain/metrics.json").read_text())
    assert metrics["epochs"] == 3
    assert metrics["processes"] == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_report_code_edit_reruns_report(projects, engine):
    project = projects[engine]
    source = project.path / "msvq" / "report" / "table.py"
    source.write_text(source.read_text() + "\n# edited by a test\n")
    assert project.run() == {"report"}


BAD_PARAMS = {
    "unknown top-level key": (lambda raw: raw.update(pretrian={"epochs": 3}), "pretrian"),
    "unknown nested key": (lambda raw: raw["linear"].update(epochz=3), "linear.epochz"),
    "invalid value": (lambda raw: raw["pretrain"].update(lr=-1.0), "pretrain.lr"),
    "missing override section": (
        lambda raw: raw["overrides"]["datasets"]["cifar10"].pop("linear"), "overrides.datasets.cifar10.linear",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
@pytest.mark.parametrize("engine", ENGINES)
def test_bad_params_fail_before_any_job(projects, engine, case):
    project = projects[engine]
    edit, key = BAD_PARAMS[case]
    good = project.params_file.read_text()
    checkpoints = sorted((project.path / "results" / "runs").glob("*/*/pretrain/checkpoint.pt"))
    before = {path: path.stat().st_mtime_ns for path in checkpoints}
    try:
        change_params(project, edit)
        ran = project.run(check=False)
        assert project.returncode != 0, project.last_output[-3000:]
        assert key in project.last_output
        assert ran <= {"check_params"}
    finally:
        project.params_file.write_text(good)
    assert {path: path.stat().st_mtime_ns for path in checkpoints} == before
    assert all(path.is_file() for path in checkpoints)


def test_dvc_exp_run_rejects_mistyped_key(projects):
    project = projects["dvc"]
    good = project.params_file.read_text()
    try:
        # DVC itself rejects -S for a key the file lacks, unless it is prefixed with +.
        typo = project.command(str(BIN / "dvc"), "exp", "run", "-S", "config/params.yaml:linear.epochz=5",
                               check=False)
        assert typo.returncode != 0
        assert "linear.epochz" in project.last_output
        added = project.command(str(BIN / "dvc"), "exp", "run", "-S", "config/params.yaml:+linear.epochz=5",
                                check=False)
        assert added.returncode != 0
        assert "unknown key linear.epochz" in project.last_output
        assert "Running stage 'check_params'" in project.last_output
        assert "Running stage 'pretrain" not in project.last_output
    finally:
        project.params_file.write_text(good)
