rule examples_split:
    input:
        store="data/standardized/{split}.zarr",
    output:
        examples=directory("data/examples/{split}.zarr"),
        provenance="results/provenance/jobs/examples_{split}.json",
    log:
        "logs/examples/{split}.log",
    params:
        config=lambda w: stage_config("reconstruction", "examples", split=w.split),
    wildcard_constraints:
        split="|".join(SPLITS),
    threads: 2
    resources:
        mem_mb=get_examples_mem_mb,
        runtime=get_examples_runtime,
    conda:
        "../../envs/cpu.yaml"
    shell:
        rule_command("examples", split="{wildcards.split}")


rule examples:
    localrule: True
    input:
        stage_target("examples", "examples_split", EXAMPLE_STORES),
