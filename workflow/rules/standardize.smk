# A standardize task's host memory: holopipe.run.resources.standardize_bytes_per_pixel.
STANDARDIZE_BYTES_PER_PIXEL = cost_model.standardize_bytes_per_pixel(config["standardize"])


rule standardize_fit:
    input:
        store=f"data/augmented/{TRAIN_SPLIT}.zarr",
    output:
        **standardize_stats_files(),
        provenance="results/provenance/jobs/standardize_fit.json",
    log:
        "logs/standardize/fit.log",
    params:
        config=lambda w: stage_config("standardize"),
    threads: 2
    resources:
        mem_mb=frame_mem_mb(STANDARDIZE_BYTES_PER_PIXEL, holograms_in_memory=2),
        runtime=get_standardize_runtime,
        gpu=gpus("standardize"),
    conda:
        "../../envs/cpu.yaml"
    shell:
        rule_command("standardize fit")


rule standardize_split:
    input:
        unpack(lambda w: {"store": get_standardize_input(w), **standardize_stats_files()}),
    output:
        standardized=directory("data/standardized/{split}.zarr"),
        provenance="results/provenance/jobs/standardize_{split}.json",
    log:
        "logs/standardize/{split}.log",
    params:
        device=config["standardize"]["device"],
    wildcard_constraints:
        split="|".join(SPLITS),
    threads: 1
    resources:
        mem_mb=frame_mem_mb(STANDARDIZE_BYTES_PER_PIXEL, holograms_in_memory=2),
        runtime=get_standardize_runtime,
        gpu=gpus("standardize"),
    conda:
        "../../envs/cpu.yaml"
    shell:
        rule_command("standardize apply", device="{params.device}")


rule standardize:
    localrule: True
    input:
        expand("data/standardized/{split}.zarr", split=SPLITS),
