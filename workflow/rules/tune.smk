rule tune_study:
    input:
        unpack(training_inputs),
    output:
        *tune_journal(),
        study=TUNE_STUDY,
        provenance="results/provenance/jobs/tune_study.json",
    log:
        "logs/tune/study.log",
    params:
        config=get_tune_study_config,
    localrule: True
    threads: 2
    resources:
        mem_mb=2000,
        runtime=15,
    conda:
        "../../envs/cpu.yaml"
    shell:
        rule_command("tune study")


rule tune_worker:
    input:
        unpack(training_inputs),
        unpack(tune_study_inputs),
    output:
        flag=touch("results/tune/workers/{worker}.done"),
        provenance="results/provenance/jobs/tune_worker_{worker}.json",
    log:
        "logs/tune/worker_{worker}.log",
    params:
        config=get_tune_config,
    wildcard_constraints:
        worker=r"\d+",
    threads: TRAIN_THREADS * config["tune"]["trials_per_gpu"]
    resources:
        mem_mb=get_tune_worker_mem_mb,
        runtime=get_tune_worker_runtime,
        gpu=gpus("train"),
    conda:
        "../../envs/gpu.yaml"
    shell:
        rule_command("tune worker", worker="{wildcards.worker}", workdir="results/tune")


rule tune:
    input:
        workers=tune_worker_flags(),
        study=get_tune_summary_study(),
    output:
        best="results/tune/best.yaml",
        provenance="results/provenance/jobs/tune_summary.json",
        trials="results/tune/trials.csv",
        history=report("results/tune/plots/history.png", caption="../report/tune.rst", category="Tuning"),
        importances=report(
            "results/tune/plots/importances.png", caption="../report/tune.rst", category="Tuning"
        ),
        intermediate=report(
            "results/tune/plots/intermediate.png", caption="../report/tune.rst", category="Tuning"
        ),
    log:
        "logs/tune/summary.log",
    params:
        config=get_tune_config,
        study=tune_study_flag,
    localrule: True
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    conda:
        "../../envs/cpu.yaml"
    shell:
        rule_command("tune summarize", "{params.study}", study=None, plots="results/tune/plots")
