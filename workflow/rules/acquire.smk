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
        "holopipe --provenance {output.provenance} --threads {threads} acquire --split {wildcards.split} --config-json {params.config:q} --out {output.raw}{params.sensor}"
        " > {log} 2>&1"


rule acquire:
    localrule: True
    input:
        stage_target("acquire", "acquire_split", expand("data/raw/{split}.nc", split=SPLITS)),
