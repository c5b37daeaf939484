rule particles_split:
    input:
        detections=lambda w: expand(
            "results/inference/{split}/chunk_{chunk}.csv", split=w.split, chunk=range(config["infer"]["chunks"])
        ),
        store="data/standardized/{split}.zarr",
    output:
        "results/particles/{split}_unet.csv",
    log:
        "logs/particles/{split}.log",
    params:
        config=lambda w: stage_config("reconstruction", "particles", split=w.split),
    wildcard_constraints:
        split="|".join(SPLITS),
    threads: 1
    resources:
        mem_mb=frame_mem_mb(80, holograms_in_memory=2),
        runtime=120,
    conda:
        "../../envs/cpu.yaml"
    shell:
        "holopipe particles --in {input.detections} --store {input.store} --out {output}"
        " --config-json {params.config:q} > {log} 2>&1"


rule particles:
    localrule: True
    input:
        expand("results/particles/{split}_unet.csv", split=config["infer"]["splits"]),
