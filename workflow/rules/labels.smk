rule label_candidates:
    input:
        store="data/standardized/{split}.zarr",
        unet="results/particles/{split}_unet.csv",
        baseline="results/particles/{split}_baseline.csv",
    output:
        candidates=directory("results/labels/{split}/candidates"),
        provenance="results/provenance/jobs/label_candidates_{split}.json",
    log:
        "logs/labels/{split}_candidates.log",
    params:
        config=lambda w: stage_config("reconstruction", "evaluate", "labels", split=w.split),
    wildcard_constraints:
        split="|".join(SPLITS),
    threads: 2
    resources:
        mem_mb=get_label_candidates_mem_mb,
        runtime=get_label_candidates_runtime,
        gpu=gpus("labels"),
    conda:
        "../../envs/gpu.yaml"
    shell:
        rule_command("label-candidates", split="{wildcards.split}")
