"""preprocess: a collection (a folder, synthetic, or versioned in DVC / S3) -> validated Dataset with text features."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.common import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def preprocess(source: str, base_params: dict, params_overrides: list, dataset: Output[Dataset],
               data_version: str = ""):
    """Validate ``source`` (a collection folder mounted in the pod, synth:<preset>[:<seed>],
    dvc://<repo-url>@<rev>#<path> or s3://<bucket>/<prefix>/<collection>, downloaded into the
    Dataset folder), encode its query text features if absent and write dataset.json there.
    ``data_version`` (the resolve task's) is part of the cache key: a rerun reuses this task
    exactly when the data is the same; the source must still resolve to it."""
    from prvr import stages

    record = stages.preprocess(source, dataset.path, stages.stage_config(base_params, params_overrides),
                               expected_version=data_version or None)
    dataset.metadata.update(stages.dataset_metadata(record))
