rule acquire_split:
    input:
        get_acquire_input,
    output:
        raw="data/raw/{split}.nc",
        provenance="results/provenance/jobs/acquire_{split}.json",
    log:
        "logs/acquire/{split}.log",
    params:
        config=get_acquire_config,
        sensor=acquire_sensor_flag,
    wildcard_constraints:
        split="|".join(config["splits"]),
    threads: 1
    resources:
        mem_mb=get_acquire_mem_mb,
        runtime=get_acquire_runtime,
        gpu=get_acquire_gpus,
    conda:
        "../../envs/cpu.yaml"
    shell:
        rule_command("acquire", "{params.sensor}", split="{wildcards.split}")


rule acquire:
    localrule: True
    input:
        stage_target("acquire", "acquire_split", expand("data/raw/{split}.nc", split=SPLITS)),
