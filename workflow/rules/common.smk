# Shared helpers: the params file, its validation, and per-stage parameters, sources
# and command lines from msvq.workflow (which dvc.yaml mirrors).

import os
import shlex

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from msvq import workflow as stages
from msvq.config import ParamsError, load_params


def params_file():
    """Return the params file the msvq commands read: the last --configfile, if any."""
    if workflow.config_settings.config:
        raise WorkflowError(
            "msvq reads its parameters from the params file only, so --config "
            f"{' '.join(workflow.config_settings.config)} would not reach its commands. "
            "Edit a copy of config/params.yaml and pass it with --configfile FILE."
        )
    files = workflow.config_settings.configfiles
    if len(files) > 1:
        raise WorkflowError(
            f"pass one --configfile (got {len(files)}); msvq merges no params files"
        )
    if files:
        return os.path.relpath(files[0])
    return "config/params.yaml"


PARAMS_FILE = params_file()
try:
    PARAMS = load_params(PARAMS_FILE)
    stages.check_tracked_keys(PARAMS.raw, PARAMS_FILE)
except ParamsError as error:
    raise WorkflowError(f"msvq: {error}") from None

# Without --replace-workflow-config, Snakemake merges a --configfile over
# config/params.yaml. The jobs read only the file they are given, so the config
# becomes exactly that file.
config.clear()
config.update(PARAMS.raw)
validate(config, schema="../schemas/params.schema.yaml")

DATASETS = list(PARAMS.datasets)
METHODS = list(PARAMS.methods)
ROOT = PARAMS.raw["data"]["root"]
RESULTS = stages.RESULTS
RUNS = stages.RUNS
RANDOM = stages.RANDOM_METHOD
# Threads per process of a GPU job: its Python process and the kernels it launches. On
# a CPU-only machine the cap of --cores applies, so a job there gets at most all cores.
GPU_JOB_THREADS = 4
# Console output also goes to the job's log, so progress bars stay visible.
TO_LOG = " 2>&1 | tee {log:q}"


wildcard_constraints:
    dataset="|".join(DATASETS),
    method="|".join(METHODS),


def command(stage, dataset=None, method=None):
    """Return the shell command of ``stage`` with {wildcards.*} left for Snakemake."""
    argv = stages.stage_command(stage, "{PARAMS_FILE}", dataset, method)
    words = [word if "{" in word else shlex.quote(word) for word in argv]
    return " ".join(words).replace("{PARAMS_FILE}", "{PARAMS_FILE:q}") + TO_LOG


def tracked(stage, per_method=True):
    """Return a params function: the key paths and values ``stage`` reads."""

    def subset(wildcards):
        method = wildcards.get("method") if per_method else None
        return stages.stage_params(PARAMS.raw, stage, wildcards.get("dataset"), method)

    return subset


def processes(stage, per_method=True):
    """Return a function of the wildcards: the processes (GPUs) one job of ``stage`` starts."""

    def count(wildcards):
        method = wildcards.method if per_method else RANDOM
        return stages.stage_processes(PARAMS, stage, wildcards.dataset, method)

    return count


def gpu_job_threads(stage, per_method=True):
    """Return a function of the wildcards: the threads of a job of ``stage``, GPU_JOB_THREADS per process."""
    count = processes(stage, per_method)
    return lambda wildcards: GPU_JOB_THREADS * count(wildcards)


def run_dir(dataset, method, stage):
    return f"{RUNS}/{dataset}/{method}/{stage}"
