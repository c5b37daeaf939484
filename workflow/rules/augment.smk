rule augment:
    input:
        regridded=f"data/regridded/{TRAIN_SPLIT}.zarr",
    output:
        store=directory(f"data/augmented/{TRAIN_SPLIT}.zarr"),
        provenance=f"results/provenance/jobs/augment_{TRAIN_SPLIT}.json",
        gallery=report(
            "results/augment/gallery.png",
            caption="../report/augment_gallery.rst",
            category="Augmentation",
        ),
    log:
        "logs/augment/train.log",
    params:
        config=lambda w: stage_config("augment"),
    threads: 1
    resources:
        mem_mb=get_augment_mem_mb,
        runtime=get_augment_runtime,
        gpu=gpus("augment"),
    conda:
        "../../envs/cpu.yaml"
    shell:
        rule_command("augment")

