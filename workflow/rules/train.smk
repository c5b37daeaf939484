rule train:
    input:
        unpack(training_inputs),
        best="results/tune/best.yaml",
    output:
        model="results/model/model.pt",
        provenance="results/provenance/jobs/train.json",
        metrics="results/model/metrics.csv",
        curve=report(
            "results/model/learning_curve.png", caption="../report/learning_curve.rst", category="Training"
        ),
    log:
        "logs/train/train.log",
    params:
        config=lambda w: stage_config("model", "train"),
    threads: TRAIN_THREADS
    resources:
        mem_mb=get_train_mem_mb,
        runtime=get_train_runtime,
        gpu=gpus("train"),
    conda:
        "../../envs/gpu.yaml"
    shell:
        rule_command("train", out="results/model")

