rule augment_train:
    input:
        f"data/regridded/{TRAIN_SPLIT}.zarr",
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
        mem_mb=frame_mem_mb(40, holograms_in_memory=2),
        runtime=60,
    conda:
        "../../envs/cpu.yaml"
    shell:
        "holopipe --provenance {output.provenance} augment --in {input} --out {output.store} --gallery {output.gallery}"
        " --config-json {params.config:q} > {log} 2>&1"


rule augment:
    localrule: True
    input:
        rules.augment_train.output,
