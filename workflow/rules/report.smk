# The figures and the table over every dataset and method. The figures are wrapped in
# report() so `snakemake --report FILE.html` shows them.

def figure(name, category, **labels):
    """Return a figure path marked for Snakemake's HTML report."""
    return report(f"{RESULTS}/figures/{name}", category=category, labels=labels)


RUN_PAIRS = [(dataset, method) for dataset in DATASETS for method in METHODS]
REPORT_OUTPUTS = dict(
    table_md=f"{RESULTS}/table.md",
    table_csv=report(f"{RESULTS}/table.csv", category="Results table"),
    knn=[figure(f"knn_{dataset}.png", "kNN top-1", dataset=dataset) for dataset in DATASETS],
    tsne=[figure(f"tsne_{d}_{m}.png", "t-SNE", dataset=d, method=m) for d, m in RUN_PAIRS],
)


rule report:
    input:
        stages.stage_sources("report"),
        paper=stages.PAPER_FILE,
        prepared=[f"{ROOT}/prepared/{dataset}" for dataset in DATASETS],
        checkpoints=[f"{run_dir(d, m, 'pretrain')}/checkpoint.pt" for d, m in RUN_PAIRS],
        knn=[f"{run_dir(d, m, 'pretrain')}/knn.csv" for d, m in RUN_PAIRS],
        linear=[f"{run_dir(d, m, 'linear')}/metrics.json" for d, m in RUN_PAIRS],
        random=[f"{run_dir(d, RANDOM, 'linear')}/metrics.json" for d in DATASETS],
    output:
        **REPORT_OUTPUTS,
    params:
        tracked=tracked("report"),
    log:
        "logs/report.log",
    shell:
        command("report")
