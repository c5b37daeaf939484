from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


rule all:
    localrule: True
    input:
        get_raw_files(),


include: "workflow/rules/acquire.smk"
