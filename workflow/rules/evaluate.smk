# Linear evaluation of each pretrained backbone, and of a random initialisation of
# the same network per dataset (the baseline that shows what pretraining added).


rule linear_eval:
    input:
        stages.stage_sources("linear"),
        prepared=f"{ROOT}/prepared/{{dataset}}",
        checkpoint=f"{RUNS}/{{dataset}}/{{method}}/pretrain/checkpoint.pt",
    output:
        metrics=f"{RUNS}/{{dataset}}/{{method}}/linear/metrics.json",
        curve=f"{RUNS}/{{dataset}}/{{method}}/linear/curve.csv",
    params:
        tracked=tracked("linear"),
    log:
        "logs/{dataset}/{method}/linear.log",
    threads: gpu_job_threads("linear")
    resources:
        # linear.nproc processes, one GPU each, started by msvq under torchrun when above 1.
        gpu=processes("linear"),
    shell:
        command("linear", "{wildcards.dataset}", "{wildcards.method}")


rule linear_eval_random:
    input:
        stages.stage_sources("linear"),
        prepared=f"{ROOT}/prepared/{{dataset}}",
    output:
        metrics=f"{RUNS}/{{dataset}}/{RANDOM}/linear/metrics.json",
        curve=f"{RUNS}/{{dataset}}/{RANDOM}/linear/curve.csv",
    params:
        tracked=tracked("linear", per_method=False),
    log:
        f"logs/{{dataset}}/{RANDOM}/linear.log",
    threads: gpu_job_threads("linear", per_method=False)
    resources:
        gpu=processes("linear", per_method=False),
    shell:
        command("linear", "{wildcards.dataset}", RANDOM)
