rule regrid_split:
    input:
        raw="data/raw/{split}.nc",
    output:
        store=directory("data/regridded/{split}.zarr"),
        provenance="results/provenance/jobs/regrid_{split}.json",
    log:
        "logs/regrid/{split}.log",
    params:
        config=lambda w: stage_config("regrid", split=w.split, examples=["tile_size"]),
    wildcard_constraints:
        split="|".join(SPLITS),
    threads: 1
    resources:
        mem_mb=get_regrid_mem_mb,
        runtime=get_regrid_runtime,
        gpu=gpus("regrid"),
    conda:
        "../../envs/cpu.yaml"
    shell:
        rule_command("regrid")


rule regrid:
    localrule: True
    input:
        stage_target("regrid", "regrid_split", expand("data/regridded/{split}.zarr", split=SPLITS)),
