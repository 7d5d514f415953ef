# The msvq pipeline for Snakemake 9: download, prepare, pretrain, linear-eval, report.
#
#   snakemake                                  # the paper (config/params.yaml); the
#                                              # default profile sets --cores all and
#                                              # --resources gpu=1
#   snakemake --configfile config/demo.yaml    # the offline CPU demo
#   snakemake --report results/report.html     # figures and table as one HTML page
#
# Every job runs one `msvq` command; dvc.yaml runs the same commands. Rules only wire
# files together, and msvq/workflow.py says which parameters and sources each reads.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
