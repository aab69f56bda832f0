"""evaluate: Model + Dataset -> Metrics (R@K, SumR per score), HTML and Markdown reports,
and an evaluation folder (metrics.json, plots/) for the registry."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.common import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(dataset: Input[Dataset], model: Input[Model], base_params: dict, params_overrides: list,
             metrics: Output[Metrics], report: Output[HTML], summary: Output[Markdown],
             evaluation: Output[Artifact]):
    """Score the eval.split queries against its videos with the fused, clip and frame scores."""
    import shutil

    from prvr import stages

    result = stages.evaluate_step(dataset.path, model.path, evaluation.path,
                                  stages.stage_config(base_params, params_overrides))
    for key, value in stages.kfp_metrics(result["metrics"]).items():
        metrics.log_metric(key, value)
    shutil.copyfile(result["html"], report.path)
    shutil.copyfile(result["markdown"], summary.path)
