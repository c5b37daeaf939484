rule provenance_summary:
    input:
        records=provenance_records,
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
        rule_command("provenance", recorded=False, out_dir="results/provenance")


rule workflow_graphs:
    input:
        configfile=rules.provenance_summary.output.config,
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
        rule_command("graphs", recorded=False, snakefile="{params.snakefile}", out_dir="results/provenance")


rule report_html:
    input:
        evaluation=rules.evaluate.output,
        graphs=rules.workflow_graphs.output,
        configfile=rules.provenance_summary.output.config,
    output:
        out="results/report.html",
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
        rule_command("report", recorded=False, snakefile="{params.snakefile}", targets="evaluate workflow_graphs")


rule report:
    localrule: True
    input:
        rules.report_html.output,
