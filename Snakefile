from snakemake.utils import min_version

from holopipe.run.cli import rule_command

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


TRAIN_SPLIT = "train"
VALID_SPLIT = "valid"


include: "workflow/rules/common.smk"


rule all:
    localrule: True
    input:
        EXAMPLE_STORES,
        "results/evaluation/metrics.json",
        expand("results/labels/{split}/candidates", split=config["infer"]["splits"]),
        "results/report.html",


include: "workflow/rules/acquire.smk"
include: "workflow/rules/regrid.smk"
include: "workflow/rules/augment.smk"
include: "workflow/rules/standardize.smk"
include: "workflow/rules/examples.smk"
include: "workflow/rules/tune.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/particles.smk"
include: "workflow/rules/baseline.smk"
include: "workflow/rules/labels.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
