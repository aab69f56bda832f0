"""The prvr pipeline for Kubeflow Pipelines v2: preprocess -> train -> evaluate -> register.

Compile (writes pipelines/prvr.yaml next to this file; the YAML is committed and
tests/test_pipeline.py fails when it is stale)::

    python pipelines/prvr.py

Submit to a cluster (see docs/pipeline.md)::

    kfp --endpoint URL run create -e prvr -r run-1 -f pipelines/prvr.yaml \\
        source=/mnt/data/tvr registry_uri=s3://models/prvr epochs=100

Parameter defaults come from params.yaml at compile time; ``base_params`` carries the
whole file, ``params_overrides`` takes ``section.key=value`` strings applied last.
"""

import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:        # `python pipelines/prvr.py` and `kfp dsl compile --py` both work
    sys.path.insert(0, str(ROOT))

from kfp import compiler, dsl  # noqa: E402
from kfp.dsl import Artifact, Dataset  # noqa: E402

from components import evaluate, preprocess, register, train  # noqa: E402
from components.common import DEFAULT_CONFIG as CFG  # noqa: E402
from components.common import DEFAULT_PARAMS, GPU_RESOURCE, TRAIN_GPUS  # noqa: E402

PIPELINE_YAML = Path(__file__).with_suffix(".yaml")


@dsl.pipeline(name="prvr", description="Partially relevant video retrieval (MS-SL++): preprocess a "
                                       "collection, train, evaluate, and register the model if it beats "
                                       "production.")
def prvr_pipeline(
    source: str = f"synth:{CFG.synth.preset}:{CFG.synth.seed}",
    variant: str = CFG.model.variant,
    epochs: int = CFG.train.epochs,
    alpha: float = CFG.model.alpha,
    nproc_per_node: int = 1,
    registry_uri: str = CFG.registry.uri,
    endpoint_url: str = CFG.registry.endpoint_url or "",
    promotion_margin: float = CFG.registry.promotion_margin,
    params_overrides: list = [],  # noqa: B006 - KFP needs a literal default
    base_params: dict = DEFAULT_PARAMS,
) -> NamedTuple("Outputs", [("dataset", Dataset), ("evaluation", Artifact), ("decision", Artifact)]):
    prep = preprocess(source=source, base_params=base_params, params_overrides=params_overrides)
    prep.set_display_name("preprocess")

    fit = train(dataset=prep.outputs["dataset"], base_params=base_params, params_overrides=params_overrides,
                variant=variant, epochs=epochs, alpha=alpha, nproc_per_node=nproc_per_node)
    # One NVIDIA GPU by default (PRVR_TRAIN_GPUS at compile time); without a GPU it runs on the CPU.
    fit.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(TRAIN_GPUS)
    fit.set_display_name("train")

    ev = evaluate(dataset=prep.outputs["dataset"], model=fit.outputs["model"], base_params=base_params,
                  params_overrides=params_overrides)
    ev.set_display_name("evaluate")

    gate = register(model=fit.outputs["model"], evaluation=ev.outputs["evaluation"],
                    dataset=prep.outputs["dataset"], base_params=base_params, params_overrides=params_overrides,
                    registry_uri=registry_uri, promotion_margin=promotion_margin, endpoint_url=endpoint_url)
    gate.set_display_name("register")
    gate.set_caching_options(False)   # it moves the registry's production pointer: never skip it

    outputs = NamedTuple("Outputs", [("dataset", Dataset), ("evaluation", Artifact), ("decision", Artifact)])
    return outputs(prep.outputs["dataset"], ev.outputs["evaluation"], gate.outputs["decision"])


def compile_pipeline(package_path: "str | Path" = PIPELINE_YAML) -> Path:
    """Write the pipeline spec YAML (default: pipelines/prvr.yaml)."""
    compiler.Compiler().compile(prvr_pipeline, str(package_path))
    return Path(package_path)


if __name__ == "__main__":
    print(compile_pipeline(sys.argv[1] if len(sys.argv) > 1 else PIPELINE_YAML))
