# A standardize task holds its hologram, or its window (of raw holograms for a running median, of their contrasts
# for stationary), as float32 copies, and float32 frames of work (background, ratio, the written chunk): 4 bytes x
# window + 24 bytes per pixel per thread. Measured on a 4872 x 3248 frame (smooth, before stationary): 447 MB peak
# with one thread, 524 MB with two (/usr/bin/time -v).
STANDARDIZE_WINDOW = (config["standardize"]["window"] if config["standardize"]["background"] == "running_median"
                      or config["standardize"]["stationary"] else 1)


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
        mem_mb=frame_mem_mb(4 * STANDARDIZE_WINDOW + 24, holograms_in_memory=2),
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
        mem_mb=frame_mem_mb(4 * STANDARDIZE_WINDOW + 24, holograms_in_memory=2),
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
