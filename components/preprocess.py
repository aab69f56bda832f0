"""preprocess: a collection (or a synthetic one) -> validated Dataset with text features."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.common import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def preprocess(source: str, base_params: dict, params_overrides: list, dataset: Output[Dataset]):
    """Validate ``source`` (a collection folder mounted in the pod, or synth:<preset>[:<seed>]),
    encode its query text features if absent and write dataset.json into the Dataset folder."""
    from prvr import stages

    record = stages.preprocess(source, dataset.path, stages.stage_config(base_params, params_overrides))
    dataset.metadata.update(stages.dataset_metadata(record))
