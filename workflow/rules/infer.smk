rule infer_chunk:
    input:
        model="results/model/model.pt",
        store="data/standardized/{split}.zarr",
    output:
        **infer_outputs(),
        provenance="results/provenance/jobs/infer_{split}_chunk_{chunk}.json",
    log:
        "logs/infer/{split}_chunk_{chunk}.log",
    params:
        config=lambda w: stage_config("reconstruction", "infer", split=w.split),
        chunks=config["infer"]["chunks"],
        probabilities=probabilities_flag,
    wildcard_constraints:
        split="|".join(SPLITS),
        chunk=r"\d+",
    threads: 2
    resources:
        mem_mb=get_infer_mem_mb,
        runtime=get_infer_runtime,
        gpu=gpus("infer"),
    conda:
        "../../envs/gpu.yaml"
    shell:
        rule_command(
            "infer",
            "{params.probabilities}",
            probabilities=None,
            chunk="{wildcards.chunk}",
            chunks="{params.chunks}",
            mem_mb="{resources.mem_mb}",
        )


rule infer:
    localrule: True
    input:
        stage_target(
            "infer",
            "infer_chunk",
            expand(
                "results/inference/{split}/chunk_{chunk}.csv",
                split=config["infer"]["splits"],
                chunk=range(config["infer"]["chunks"]),
            ),
        ),


rule valid_detections:
    localrule: True
    input:
        detections=expand(
            "results/inference/{split}/chunk_{chunk}.csv", split=VALID_SPLIT, chunk=range(config["infer"]["chunks"])
        ),
        store=f"data/standardized/{VALID_SPLIT}.zarr",
