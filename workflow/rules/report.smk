rule provenance_summary:
    input:
        provenance_records,
    output:
        jobs=report(
            "results/provenance/jobs.csv",
            caption="../report/provenance.rst",
            category="Provenance",
            labels={"table": "jobs: hardware, time, config hash, commit"},
        ),
        files=report(
            "results/provenance/files.csv",
            caption="../report/provenance.rst",
            category="Provenance",
            labels={"table": "files: inputs and outputs with SHA-256"},
        ),
        packages=report(
            "results/provenance/packages.csv",
            caption="../report/provenance.rst",
            category="Provenance",
            labels={"table": "packages: versions"},
        ),
        config=report(
            "results/provenance/config.yaml",
            caption="../report/provenance.rst",
            category="Provenance",
            labels={"table": "config: resolved"},
        ),
    log:
        "logs/report/provenance.log",
    params:
        config=lambda w: json.dumps(config, sort_keys=True),
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/cpu.yaml"
    shell:
        "holopipe provenance --records {input} --out-dir results/provenance --config-json {params.config:q}"
        " > {log} 2>&1"


rule workflow_graphs:
    input:
        config=rules.provenance_summary.output.config,
    output:
        graphs=report(
            expand("results/provenance/{graph}.{ext}", graph=("dag", "rulegraph"), ext=GRAPH_FORMATS),
            caption="../report/graphs.rst",
            category="Workflow",
        ),
    log:
        "logs/report/graphs.log",
    params:
        snakefile=workflow.main_snakefile,
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/cpu.yaml"
    shell:
        "holopipe graphs --snakefile {params.snakefile} --configfile {input.config} --out-dir results/provenance"
        " > {log} 2>&1"


rule report_html:
    input:
        evaluation=rules.evaluate.output,
        graphs=rules.workflow_graphs.output,
        config=rules.provenance_summary.output.config,
    output:
        "results/report.html",
    log:
        "logs/report/report.log",
    params:
        snakefile=workflow.main_snakefile,
    localrule: True
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    conda:
        "../../envs/cpu.yaml"
    shell:
        "holopipe report --snakefile {params.snakefile} --configfile {input.config} --out {output}"
        " --targets evaluate workflow_graphs > {log} 2>&1"


rule report:
    localrule: True
    input:
        rules.report_html.output,
