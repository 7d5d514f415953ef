# Download and prepare one dataset. download's declared output is its verified
# checksum list: the archives beside it stay when the rule reruns, so a code change
# re-verifies them instead of fetching them again.


rule download:
    input:
        stages.stage_sources("download"),
    output:
        f"{ROOT}/raw/{{dataset}}/checksums.json",
    params:
        tracked=tracked("download"),
    log:
        "logs/{dataset}/download.log",
    shell:
        command("download", "{wildcards.dataset}")


rule prepare:
    input:
        stages.stage_sources("prepare"),
        checksums=f"{ROOT}/raw/{{dataset}}/checksums.json",
    output:
        directory(f"{ROOT}/prepared/{{dataset}}"),
    params:
        tracked=tracked("prepare"),
    log:
        "logs/{dataset}/prepare.log",
    shell:
        command("prepare", "{wildcards.dataset}")
