rule particles_split:
    input:
        detections=lambda w: expand(
            "results/inference/{split}/chunk_{chunk}.csv", split=w.split, chunk=range(config["infer"]["chunks"])
        ),
        store="data/standardized/{split}.zarr",
    output:
        particles="results/particles/{split}_unet.csv",
        provenance="results/provenance/jobs/particles_{split}.json",
    log:
        "logs/particles/{split}.log",
    params:
        config=lambda w: stage_config("reconstruction", "particles", split=w.split),
    wildcard_constraints:
        split="|".join(SPLITS),
    threads: 2
    resources:
        mem_mb=get_particles_mem_mb,
        runtime=get_particles_runtime,
        gpu=gpus("particles"),
    conda:
        "../../envs/gpu.yaml"
    shell:
        rule_command("particles")


rule particles:
    localrule: True
    input:
        stage_target(
            "particles", "particles_split", expand("results/particles/{split}_unet.csv", split=config["infer"]["splits"])
        ),
