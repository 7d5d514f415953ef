# Pretrain one method on one dataset. The resume state (pretrain/resume/last.pt) is
# not a declared output, so Snakemake leaves it in place when a job fails or reruns;
# msvq pretrain uses it only when its parameter hash matches.


rule pretrain:
    input:
        stages.stage_sources("pretrain"),
        prepared=f"{ROOT}/prepared/{{dataset}}",
    output:
        checkpoint=f"{RUNS}/{{dataset}}/{{method}}/pretrain/checkpoint.pt",
        knn=f"{RUNS}/{{dataset}}/{{method}}/pretrain/knn.csv",
        train_log=f"{RUNS}/{{dataset}}/{{method}}/pretrain/train_log.csv",
        metrics=f"{RUNS}/{{dataset}}/{{method}}/pretrain/metrics.json",
    params:
        tracked=tracked("pretrain"),
    log:
        "logs/{dataset}/{method}/pretrain.log",
    benchmark:
        "logs/{dataset}/{method}/pretrain.benchmark.tsv"
    threads: gpu_job_threads("pretrain")
    resources:
        # pretrain.nproc processes, one GPU each, started by msvq under torchrun when above 1.
        gpu=processes("pretrain"),
    shell:
        command("pretrain", "{wildcards.dataset}", "{wildcards.method}")
