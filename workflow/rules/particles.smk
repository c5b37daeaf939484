rule particles_split:
    input:
        lambda w: expand("results/inference/{split}/chunk_{chunk}.csv", split=w.split, chunk=range(config["infer"]["chunks"])),
    output:
        particles="results/particles/{split}_unet.csv",
        provenance="results/provenance/jobs/particles_{split}.json",
    log:
        "logs/particles/{split}.log",
    params:
        config=lambda w: stage_config("particles", split=w.split),
    wildcard_constraints:
        split="|".join(SPLITS),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    conda:
        "../../envs/cpu.yaml"
    shell:
        "holopipe --provenance {output.provenance} particles --in {input} --out {output.particles} --config-json {params.config:q} > {log} 2>&1"


rule particles:
    localrule: True
    input:
        expand("results/particles/{split}_unet.csv", split=config["infer"]["splits"]),
