"""train: Dataset -> Model (model.pt, dvclive/, params.yaml) + validation Metrics."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.common import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(dataset: Input[Dataset], base_params: dict, params_overrides: list, variant: str, epochs: int,
          alpha: float, nproc_per_node: int, model: Output[Model], metrics: Output[Metrics]):
    """Train model.variant on the dataset; nproc_per_node > 1 runs torchrun (one process per GPU)."""
    from prvr import stages

    cfg = stages.stage_config(base_params, [f"model.variant={variant!r}", f"train.epochs={epochs}",
                                            f"model.alpha={alpha}", *params_overrides])
    result = stages.train_step(dataset.path, model.path, cfg, nproc=nproc_per_node, keep_last=False)
    model.metadata.update(stages.train_metadata(result))
    for key, value in stages.train_metadata(result).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
