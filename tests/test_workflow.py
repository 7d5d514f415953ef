"""msvq.workflow: the per-stage keys, sources and commands both engines use; dvc.yaml drift."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from msvq import workflow
from msvq.cli import main
from msvq.config import ParamsError, load_params
from tests.tiny import REPO
from tests.workflow_project import BIN, copy_project

PAPER = REPO / "config" / "params.yaml"


def test_tracked_keys_of_pretrain_name_overrides():
    keys = workflow.tracked_keys("pretrain", "cifar10", "msvq")
    assert keys[:4] == ["data", "model", "pretrain", "method"]
    assert "overrides.datasets.cifar10.pretrain" in keys
    assert "overrides.methods.msvq.method" in keys
    assert not any(key.endswith(".linear") for key in keys)


def test_tracked_keys_of_random_baseline_skip_method():
    keys = workflow.tracked_keys("linear", "cifar10", workflow.RANDOM_METHOD)
    assert "overrides.datasets.cifar10.linear" in keys
    assert not any(key.startswith("overrides.methods") for key in keys)


def test_stage_params_sorted_and_stable():
    raw = load_params(PAPER).raw
    params = workflow.stage_params(raw, "pretrain", "stl10", "mocov2")
    assert list(params) == workflow.tracked_keys("pretrain", "stl10", "mocov2")
    assert list(params["pretrain"]) == sorted(params["pretrain"])
    assert params["overrides.datasets.stl10.data"] == {"crop": 64}
    assert params["overrides.methods.mocov2.method"]["tau_s"] == 0.2


def test_check_tracked_keys_lists_missing_sections():
    raw = load_params(PAPER).raw
    del raw["overrides"]["datasets"]["stl10"]["linear"]
    del raw["overrides"]["methods"]["mq"]
    with pytest.raises(ParamsError) as error:
        workflow.check_tracked_keys(raw, "p.yaml")
    message = str(error.value)
    assert "overrides.datasets.stl10.linear" in message
    assert "overrides.methods.mq.data" in message
    assert "overrides.datasets.cifar10" not in message


def test_paper_and_demo_params_carry_all_sections():
    for path in (PAPER, REPO / "config" / "demo.yaml"):
        workflow.check_tracked_keys(load_params(path).raw, path)


def test_pretrain_sources_exclude_report_code():
    sources = workflow.stage_sources("pretrain")
    assert "msvq/models/resnet.py" in sources
    assert "msvq/methods/relational.py" in sources
    assert "msvq/schedule.py" in sources
    assert not any(path.startswith("msvq/report/") for path in sources)
    assert "msvq/cli.py" not in sources


def test_report_sources_include_every_report_module():
    sources = workflow.stage_sources("report")
    for module in (REPO / "msvq" / "report").glob("*.py"):
        assert f"msvq/report/{module.name}" in sources
    assert workflow.SCHEMA_FILE in sources


def test_import_closure_resolves_relative_imports(tmp_path, monkeypatch):
    package = tmp_path / "msvq"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .a import thing\n")
    (package / "sub" / "a.py").write_text("from .. import top\nimport numpy\n")
    (package / "top.py").write_text("def f():\n    from msvq.sub import b\n")
    (package / "sub" / "b.py").write_text("")
    (package / "unused.py").write_text("")
    monkeypatch.setattr(workflow, "PACKAGE_DIR", package)
    assert workflow.import_closure("msvq/sub/__init__.py") == [
        "msvq/__init__.py", "msvq/sub/__init__.py", "msvq/sub/a.py", "msvq/sub/b.py", "msvq/top.py",
    ]


def dvc_stage_deps() -> dict[str, list[str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: (stage.get("do") or stage)["deps"] for name, stage in stages.items()}


@pytest.mark.parametrize("stage,dvc_name", [
    ("download", "download"), ("prepare", "prepare"), ("pretrain", "pretrain"),
    ("linear", "linear_eval"), ("linear", "linear_eval_random"), ("report", "report"),
])
def test_dvc_yaml_lists_stage_sources(stage, dvc_name):
    listed = [dep for dep in dvc_stage_deps()[dvc_name] if dep.startswith(("msvq/", "workflow/"))]
    assert listed == workflow.stage_sources(stage), (
        f"dvc.yaml stage {dvc_name} lists other msvq sources than msvq.workflow.stage_sources({stage!r}); "
        "update its deps"
    )


@pytest.mark.parametrize("stage,dvc_name,item", [
    ("download", "download", "${item}"), ("prepare", "prepare", "${item}"),
    ("pretrain", "pretrain", ("${item.dataset}", "${item.method}")),
    ("linear", "linear_eval", ("${item.dataset}", "${item.method}")),
    ("linear", "linear_eval_random", ("${item}", workflow.RANDOM_METHOD)),
    ("report", "report", None),
])
def test_dvc_yaml_lists_tracked_keys(stage, dvc_name, item):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    body = stages[dvc_name].get("do") or stages[dvc_name]
    (entry,) = body["params"]
    if item is None:
        expected = workflow.tracked_keys(stage)
    elif isinstance(item, tuple):
        expected = workflow.tracked_keys(stage, *item)
    else:
        expected = workflow.tracked_keys(stage, item)
    assert entry["config/params.yaml"] == expected


def test_check_params_writes_stamp(tmp_path):
    stamp = tmp_path / "results" / "params.checked"
    assert main(["check-params", str(PAPER), "--stamp", str(stamp)]) == 0
    assert stamp.read_text() == "parameters valid\n"


def test_check_params_rejects_missing_section(tmp_path, capsys):
    raw = yaml.safe_load(PAPER.read_text())
    del raw["overrides"]["methods"]["msv"]["pretrain"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    stamp = tmp_path / "params.checked"
    assert main(["check-params", str(path), "--stamp", str(stamp)]) == 1
    assert "overrides.methods.msv.pretrain" in capsys.readouterr().err
    assert not stamp.exists()


def test_override_cannot_move_data_root(tmp_path, capsys):
    raw = yaml.safe_load(PAPER.read_text())
    raw["overrides"]["datasets"]["cifar10"]["data"] = {"root": "elsewhere"}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["check-params", str(path)]) == 1
    assert "overrides.datasets.cifar10.data" in capsys.readouterr().err


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("project"))


def snakemake(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=project, capture_output=True, text=True, timeout=300)


def job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:", 1)[1]
    return {name: int(count) for name, count in re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.MULTILINE)}


def test_snakemake_dry_run_on_paper_params(project):
    result = snakemake(project, "-n", "--cores", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout + result.stderr)
    params = load_params(PAPER)
    runs = len(params.datasets) * len(params.methods)
    assert len(params.datasets) == 4
    assert counts["pretrain"] == runs
    assert counts["linear_eval"] == runs
    assert counts["linear_eval_random"] == 4
    assert counts["download"] == counts["prepare"] == 4
    assert counts["report"] == 1


def test_snakemake_dry_run_on_demo_params(project):
    result = snakemake(project, "-n", "-p", "--cores", "1", "--configfile", "config/demo.yaml")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert job_counts(output)["pretrain"] == 2
    assert "--params config/demo.yaml" in output


def test_snakemake_rejects_config_option(project):
    result = snakemake(project, "-n", "--cores", "1", "--config", "pretrain={'epochs': 3}")
    assert result.returncode != 0
    assert "--configfile" in result.stdout + result.stderr


def test_snakemake_reports_unknown_key_path(project, tmp_path):
    raw = yaml.safe_load(PAPER.read_text())
    raw["pretrain"]["epoch"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    result = snakemake(project, "-n", "--cores", "1", "--configfile", str(bad))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "unknown key pretrain.epoch" in output


def test_slurm_profile_sends_gpu_rules_to_gpu_partition():
    profile = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    rules_text = "\n".join(path.read_text() for path in (REPO / "workflow" / "rules").glob("*.smk"))
    gpu_rules = set(re.findall(r"^rule (\w+):(?:(?!^rule ).)*?gpu=processes\(", rules_text, flags=re.MULTILINE | re.DOTALL))
    assert gpu_rules == {"pretrain", "linear_eval", "linear_eval_random"}
    assert profile["executor"] == "slurm"
    assert set(profile["set-resources"]) == gpu_rules
    for rule in gpu_rules:
        assert profile["set-resources"][rule]["slurm_partition"] != profile["default-resources"]["slurm_partition"]


def job_resources(output: str) -> list[tuple[str, str, int, int]]:
    """Return (rule, wildcards, threads, gpu) of each job a dry run prints with a gpu resource."""
    jobs = []
    for block in re.split(r"^(?=(?:local)?rule \w+:)", output, flags=re.MULTILINE):
        rule = re.search(r"^(?:local)?rule (\w+):", block, flags=re.MULTILINE)
        gpu = re.search(r"resources: .*\bgpu=(\d+)", block)
        if rule and gpu:
            wildcards = re.search(r"wildcards: (.*)", block).group(1)
            threads = int(re.search(r"threads: (\d+)", block).group(1))
            jobs.append((rule.group(1), wildcards, threads, int(gpu.group(1))))
    return jobs


def test_gpu_jobs_request_nproc_gpus(project, tmp_path):
    raw = yaml.safe_load(PAPER.read_text())
    raw["datasets"], raw["methods"] = ["cifar10", "stl10"], ["msvq"]
    raw["pretrain"]["nproc"] = 2
    raw["overrides"]["datasets"]["stl10"]["pretrain"] = {"nproc": 4}
    raw["overrides"]["datasets"]["stl10"]["linear"] = {"nproc": 2}
    params_file = tmp_path / "nproc.yaml"
    params_file.write_text(yaml.safe_dump(raw))

    result = snakemake(project, "-n", "--cores", "64", "--resources", "gpu=8", "--configfile", str(params_file))

    assert result.returncode == 0, result.stderr[-3000:]
    printed = job_resources(result.stdout + result.stderr)
    jobs = {(rule, wildcards): (threads, gpu) for rule, wildcards, threads, gpu in printed}
    assert jobs[("pretrain", "dataset=cifar10, method=msvq")] == (8, 2)
    assert jobs[("pretrain", "dataset=stl10, method=msvq")] == (16, 4)
    assert jobs[("linear_eval", "dataset=cifar10, method=msvq")] == (4, 1)
    assert jobs[("linear_eval", "dataset=stl10, method=msvq")] == (8, 2)
    assert jobs[("linear_eval_random", "dataset=stl10")] == (8, 2)
