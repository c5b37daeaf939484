rule baseline_split:
    input:
        store="data/standardized/{split}.zarr",
    output:
        particles="results/particles/{split}_baseline.csv",
        provenance="results/provenance/jobs/baseline_{split}.json",
    log:
        "logs/baseline/{split}.log",
    params:
        config=lambda w: stage_config("reconstruction", "baseline", split=w.split),
    wildcard_constraints:
        split="|".join(SPLITS),
    threads: 2
    resources:
        mem_mb=get_baseline_mem_mb,
        runtime=get_baseline_runtime,
        gpu=gpus("baseline"),
    conda:
        "../../envs/gpu.yaml"
    shell:
        rule_command("baseline")


rule baseline:
    localrule: True
    input:
        stage_target(
            "baseline", "baseline_split", expand("results/particles/{split}_baseline.csv", split=config["infer"]["splits"])
        ),
