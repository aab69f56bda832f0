"""resolve: a source -> the version of its data, without fetching features (preprocess's cache key)."""

from typing import NamedTuple

from kfp import dsl

from components.common import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve(source: str, base_params: dict,
            params_overrides: list) -> NamedTuple("ResolveOutputs", [("source", str), ("data_version", str)]):
    """The data version ``source`` names now: ``dvc:<commit>:<md5>`` (git + the .dvc entry, no
    download), ``s3:<sha256 of the (key, ETag) list>`` or ``md5:<fingerprint>`` of a folder or
    synth: collection. Never cache this task: a moved branch or a replaced object changes it."""
    from typing import NamedTuple

    from prvr import stages

    resolved = stages.resolve_source(source, stages.stage_config(base_params, params_overrides))
    outputs = NamedTuple("ResolveOutputs", [("source", str), ("data_version", str)])
    return outputs(resolved["source"], resolved["data_version"])
