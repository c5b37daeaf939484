rule evaluate:
    input:
        truth=expand("data/standardized/{split}.zarr", split=config["infer"]["splits"]),
        unet=expand("results/particles/{split}_unet.csv", split=config["infer"]["splits"]),
        baseline=expand("results/particles/{split}_baseline.csv", split=config["infer"]["splits"]),
        candidates=expand("results/labels/{split}/candidates", split=config["infer"]["splits"]),
        labels=get_label_files,
    output:
        metrics="results/evaluation/metrics.json",
        split_metrics=evaluation_split_metrics(),
        provenance="results/provenance/jobs/evaluate.json",
        plots=report(
            multiext(
                "results/evaluation/",
                "scatter3d.png",
                "diameters.png",
                "errors.png",
                "recall_by_diameter.png",
                "recall_by_depth.png",
                "recall_grid.png",
                "size_error.png",
                "f1_bars.png",
            ),
            caption="../report/evaluation.rst",
            category="Evaluation",
        ),
        label_plots=report(
            multiext("results/evaluation/", "labels_table.png", "labels_gallery.png"),
            caption="../report/labels.rst",
            category="Hand labels",
        ),
    log:
        "logs/evaluate/evaluate.log",
    params:
        config=lambda w: stage_config("evaluate"),
        truth=evaluation_pairs("data/standardized/{split}.zarr"),
        predictions=evaluation_pairs("results/particles/{split}_{method}.csv", methods=("unet", "baseline")),
        candidates=evaluation_pairs("results/labels/{split}/candidates"),
        labels=label_flags,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    conda:
        "../../envs/cpu.yaml"
    shell:
        rule_command(
            "evaluate",
            "{params.labels}",
            truth="{params.truth}",
            prediction="{params.predictions}",
            plots="results/evaluation",
            candidates="{params.candidates}",
            labels=None,
        )
