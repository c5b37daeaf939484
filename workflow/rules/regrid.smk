rule regrid_split:
    input:
        "data/raw/{split}.nc",
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
        mem_mb=frame_mem_mb(40, holograms_in_memory=2),
        runtime=30,
    conda:
        "../../envs/cpu.yaml"
    shell:
        "holopipe --provenance {output.provenance} regrid --in {input} --out {output.store} --config-json {params.config:q} > {log} 2>&1"


rule regrid:
    localrule: True
    input:
        expand("data/regridded/{split}.zarr", split=SPLITS),
