"""register: the promotion gate. Model + evaluation -> a registry version (always) + decision."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.common import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(model: Input[Model], evaluation: Input[Artifact], dataset: Input[Dataset], base_params: dict,
             params_overrides: list, registry_uri: str, promotion_margin: float, endpoint_url: str,
             decision: Output[Artifact]) -> NamedTuple("RegisterOutputs", [("promoted", bool), ("version", str),
                                                                           ("reason", str)]):
    """Build the serving index (serve.corpus), register model + index + metrics with the decision, and
    promote them only if test SumR beats production, evaluated on this same test split, by more than
    promotion_margin. decision = folder with decision.json."""
    import os
    from typing import NamedTuple

    from prvr import stages

    result = stages.register_step(model.path, os.path.join(evaluation.path, "metrics.json"), dataset.path,
                                  stages.stage_config(base_params, params_overrides), registry_uri,
                                  promotion_margin, endpoint_url or None, out_dir=decision.path)
    decision.metadata.update({k: result[k] for k in ("promoted", "reason", "model_name", "registry_uri")})
    outputs = NamedTuple("RegisterOutputs", [("promoted", bool), ("version", str), ("reason", str)])
    return outputs(bool(result["promoted"]), result["version"] or "", result["reason"])
