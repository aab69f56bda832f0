"""The prvr pipeline for Kubeflow Pipelines v2: resolve -> preprocess -> train -> evaluate -> register.

Compile the default (writes pipelines/prvr.yaml next to this file; the YAML is committed
and tests/test_pipeline.py fails when it is stale)::

    python pipelines/prvr_pipeline.py
    # the same: prvr pipeline compile
    # the same: kfp dsl compile --py pipelines/prvr_pipeline.py --output pipelines/prvr.yaml

Compile for a cluster (PVC, S3 secret, GPUs, node selector, tolerations, resources,
retries: pipelines/options.py, docs/pipeline.md)::

    prvr pipeline compile --out prvr-cluster.yaml --pvc tvr-data:/mnt/data --s3-secret prvr-s3 --gpus 2

Submit to a cluster (see docs/pipeline.md)::

    kfp --endpoint URL run create -e prvr -r run-1 -f pipelines/prvr.yaml \\
        source=/mnt/data/tvr registry_uri=s3://models/prvr epochs=100

Parameter defaults come from params.yaml at compile time; ``base_params`` carries the
whole file, ``params_overrides`` takes ``section.key=value`` strings applied last.

(The file is not called ``prvr.py``: ``kfp dsl compile --py`` puts this folder first on
sys.path, where a ``prvr`` module would shadow the ``prvr`` package.)
"""

import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:        # `python pipelines/prvr_pipeline.py` and `kfp dsl compile --py` both work
    sys.path.insert(0, str(ROOT))

from kfp import compiler, dsl  # noqa: E402
from kfp.dsl import Artifact, Dataset  # noqa: E402
from kfp.dsl.graph_component import GraphComponent  # noqa: E402

from components import evaluate, preprocess, register, resolve, train  # noqa: E402
from components.common import DEFAULT_CONFIG as CFG  # noqa: E402
from components.common import DEFAULT_PARAMS  # noqa: E402
from pipelines import options  # noqa: E402
from pipelines.options import ClusterOptions  # noqa: E402

PIPELINE_YAML = ROOT / "pipelines" / "prvr.yaml"
Outputs = NamedTuple("Outputs", [("dataset", Dataset), ("evaluation", Artifact), ("decision", Artifact)])


def build_pipeline(opts: ClusterOptions | None = None) -> GraphComponent:
    """The pipeline with these cluster options (default: options.parse(), the environment's)."""
    opts = opts if opts is not None else options.parse()

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
    ) -> Outputs:
        res = resolve(source=source, base_params=base_params, params_overrides=params_overrides)
        options.apply(res, "resolve", opts)
        res.set_caching_options(False)    # it looks at the data now (a moved branch, a replaced object)

        # data_version is in preprocess's cache key: it reruns when, and only when, the data changed.
        prep = preprocess(source=res.outputs["source"], data_version=res.outputs["data_version"],
                          base_params=base_params, params_overrides=params_overrides)
        options.apply(prep, "preprocess", opts)

        fit = train(dataset=prep.outputs["dataset"], base_params=base_params, params_overrides=params_overrides,
                    variant=variant, epochs=epochs, alpha=alpha, nproc_per_node=nproc_per_node)
        options.apply(fit, "train", opts)          # image, GPUs, node selector, tolerations, retries

        ev = evaluate(dataset=prep.outputs["dataset"], model=fit.outputs["model"], base_params=base_params,
                      params_overrides=params_overrides)
        options.apply(ev, "evaluate", opts)

        gate = register(model=fit.outputs["model"], evaluation=ev.outputs["evaluation"],
                        dataset=prep.outputs["dataset"], base_params=base_params,
                        params_overrides=params_overrides, registry_uri=registry_uri,
                        promotion_margin=promotion_margin, endpoint_url=endpoint_url)
        options.apply(gate, "register", opts)
        gate.set_caching_options(False)   # it moves the registry's production pointer: never skip it

        return Outputs(prep.outputs["dataset"], ev.outputs["evaluation"], gate.outputs["decision"])

    return prvr_pipeline


# The one pipeline of this module (what `kfp dsl compile --py`, kfp.local and `prvr demo` use).
prvr_pipeline = build_pipeline()


def compile_pipeline(package_path: "str | Path" = PIPELINE_YAML, opts: ClusterOptions | None = None) -> Path:
    """Write the pipeline spec YAML (default: pipelines/prvr.yaml with the default options)."""
    pipeline = prvr_pipeline if opts is None else build_pipeline(opts)
    compiler.Compiler().compile(pipeline, str(package_path))
    return Path(package_path)


if __name__ == "__main__":
    print(compile_pipeline(sys.argv[1] if len(sys.argv) > 1 else PIPELINE_YAML))
