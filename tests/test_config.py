"""The typed config: values live in prvr/params.yaml only; the schema holds types and bounds;
the loader layers packaged file <- user file <- PRVR_<SECTION>__<KEY> env <- --set."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from prvr import config as config_module
from prvr.config import (ANN_INDEX_TYPES, PACKAGED_PARAMS, REFINE_CODES, Config, ConfigError, ModelConfig,
                         SearchConfig, default_config, default_params_path, load_config)

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("data", "synth", "text", "model", "train", "eval", "search", "registry", "serve")


@pytest.fixture(autouse=True)
def _no_config_env(monkeypatch, tmp_path):
    """Each test starts outside the repository and without PRVR_<SECTION>__<KEY> variables."""
    for name in list(os.environ):
        if name.startswith("PRVR_") and "__" in name:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _packaged_yaml() -> dict:
    return yaml.safe_load(PACKAGED_PARAMS.read_text())


# --------------------------------------------------------------------------- #
# Where the values live
# --------------------------------------------------------------------------- #
def test_repository_params_yaml_is_a_relative_symlink_to_the_packaged_file():
    link = REPO / "params.yaml"
    assert link.is_symlink()
    assert os.readlink(link) == "prvr/params.yaml"
    assert link.resolve() == PACKAGED_PARAMS == REPO / "prvr" / "params.yaml"


def test_packaged_params_hold_every_key_of_the_schema_and_no_retired_ones():
    raw = _packaged_yaml()
    assert tuple(raw) == SECTIONS
    for section in SECTIONS:
        schema = type(getattr(default_config(), section)).model_fields
        assert set(raw[section]) == set(schema), section
    assert "max_tokens" not in raw["text"] and "frame_candidates" not in raw["search"]
    assert raw["model"]["video_dim"] == 0 and raw["model"]["text_dim"] == 0


def test_the_schema_declares_no_values():
    for section in ("Config", "DataConfig", "SynthConfig", "TextConfig", "ModelConfig", "TrainConfig",
                    "EvalConfig", "SearchConfig", "RegistryConfig", "ServeConfig"):
        fields = getattr(config_module, section).model_fields
        assert fields and all(f.is_required() for f in fields.values()), section


def test_packaged_defaults_load_outside_the_repository(tmp_path):
    assert Path.cwd() == tmp_path and not (tmp_path / "params.yaml").exists()
    assert default_params_path() == PACKAGED_PARAMS
    cfg = load_config()
    assert cfg.model.variant == "ms-sl++" and cfg.model.alpha == 0.7 and cfg.model.max_desc_len == 30
    assert cfg.model.map_size == 32 and cfg.model.cluster_num == 32 and cfg.model.max_ctx_len == 128
    assert cfg.train.lr == 2.5e-4 and cfg.train.margin == 0.2 and cfg.train.hard_pool_size == 20
    assert (cfg.train.w_nce_clip, cfg.train.w_nce_frame) == (0.02, 0.04) and cfg.train.betas == [0.9, 0.999]
    assert cfg.search.milvus_uri is None and cfg.serve.fps is None
    assert cfg.num_spans == 32 * 33 // 2
    assert cfg.to_dict() == _packaged_yaml()


def test_default_config_is_fresh_and_validated_each_call():
    a, b = default_config(), default_config()
    assert a == b and a is not b and a.train is not b.train
    a.train.epochs = 3
    assert default_config().train.epochs == 100 and b.train.epochs == 100


def test_the_repository_symlink_is_not_read_as_a_user_file(monkeypatch):
    monkeypatch.chdir(REPO)
    assert default_params_path() == PACKAGED_PARAMS
    assert load_config() == default_config()


# --------------------------------------------------------------------------- #
# Layers: packaged <- user file <- environment <- --set
# --------------------------------------------------------------------------- #
def test_partial_user_file_in_cwd_merges_over_the_packaged_values(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 7\nmodel:\n  variant: ms-sl\nserve:\n")
    assert default_params_path() == Path("params.yaml")
    cfg = load_config()
    assert cfg.train.epochs == 7 and cfg.model.variant == "ms-sl"
    expected = default_config().to_dict()
    expected["train"]["epochs"], expected["model"]["variant"] = 7, "ms-sl"
    assert cfg.to_dict() == expected


def test_explicit_user_file_wins_over_cwd_file(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 7\n")
    other = tmp_path / "sub" / "mine.yaml"
    other.parent.mkdir()
    other.write_text("train:\n  lr: 1.0e-3\n")
    cfg = load_config(other)
    assert cfg.train.lr == 1e-3 and cfg.train.epochs == 100


def test_old_user_file_with_retired_and_legacy_keys_still_loads(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "text:\n  max_tokens: 30\nsearch:\n  frame_candidates: 100\n  refine_pq_m: 16\n")
    cfg = load_config()
    assert cfg.search.refine_codes == "pq16" and "max_tokens" not in cfg.to_dict()["text"]


def test_environment_layer_sits_between_the_file_and_set(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 7\n  lr: 1.0e-3\n")
    monkeypatch.setenv("PRVR_TRAIN__EPOCHS", "3")
    monkeypatch.setenv("PRVR_MODEL__VARIANT", "ms-sl")
    monkeypatch.setenv("PRVR_SEARCH__MILVUS_URI", "http://host:19530")
    monkeypatch.setenv("PRVR_TRAIN__AMP", "true")
    cfg = load_config()
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.variant) == (3, 1e-3, "ms-sl")
    assert cfg.search.milvus_uri == "http://host:19530" and cfg.train.amp is True
    assert load_config(None, ["train.epochs=5"]).train.epochs == 5


def test_single_underscore_prvr_variables_are_not_config(monkeypatch):
    for name, value in {"PRVR_REGISTRY_URI": "s3://elsewhere", "PRVR_PUSHGATEWAY": "http://pg:9091",
                        "PRVR_TORCH_THREADS": "8", "PRVR_IMAGE": "prvr:dev", "PRVR_TRAIN_GPUS": "4"}.items():
        monkeypatch.setenv(name, value)
    assert load_config() == default_config()


def test_unknown_environment_key_names_the_variable(monkeypatch):
    monkeypatch.setenv("PRVR_TRAIN__LRR", "1")
    with pytest.raises(ConfigError) as exc:
        load_config()
    assert str(exc.value) == "unknown config key 'train.lrr' (environment variable PRVR_TRAIN__LRR)"
    monkeypatch.delenv("PRVR_TRAIN__LRR")
    monkeypatch.setenv("PRVR_NOPE__X", "1")
    with pytest.raises(ConfigError, match=r"'nope\.x'.*PRVR_NOPE__X"):
        load_config()


def test_bad_environment_value_names_key_value_and_variable(monkeypatch):
    monkeypatch.setenv("PRVR_TRAIN__EPOCHS", "x")
    with pytest.raises(ConfigError) as exc:
        load_config()
    assert str(exc.value) == "train.epochs must be an integer, got 'x' (from PRVR_TRAIN__EPOCHS)"


def test_bad_file_value_names_the_file(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError) as exc:
        load_config()
    assert str(exc.value) == "train.lr must be > 0, got -1 (in params.yaml)"


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-4", "model.variant=ms-sl", "train.amp=true", "train.epochs=3.0",
                             "train.betas=[0.8, 0.9]", "search.milvus_uri=null", "train.device=cuda:1",
                             "registry.uri=s3://bucket/prefix", "data.collection=2024"])
    assert cfg.train.lr == 1e-4 and cfg.model.variant == "ms-sl" and cfg.train.amp is True
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.train.betas == [0.8, 0.9] and cfg.search.milvus_uri is None and cfg.train.device == "cuda:1"
    assert cfg.registry.uri == "s3://bucket/prefix" and cfg.data.collection == "2024"


def test_overrides_apply_together_in_order_and_in_place():
    cfg = default_config()
    search = cfg.search
    # map_size 4 alone would leave cluster_num 32 > 10 spans: checked only after both apply
    assert cfg.override(["model.map_size=4", "model.cluster_num=8", "search.nprobe=1", "search.nprobe=2"]) is cfg
    assert (cfg.model.map_size, cfg.model.cluster_num, cfg.num_spans) == (4, 8, 10)
    assert cfg.search is search and search.nprobe == 2


def test_a_failed_override_changes_nothing():
    cfg = default_config()
    with pytest.raises(ConfigError, match="train.lr must be > 0"):
        cfg.override(["train.epochs=3", "train.lr=-1"])
    assert cfg == default_config()


def test_a_zero_batch_delay_is_refused_where_torchserve_would_wait_100_ms():
    """TorchServe 0.12 takes maxBatchDelay 0 as its default (100 ms: a REST p50 of 117 ms against
    15 ms measured with serve_bench); with batches of one it is never waited for."""
    with pytest.raises(ConfigError, match="max_batch_delay_ms must be >= 1 when serve.batch_size > 1"):
        default_config().override(["serve.batch_size=4", "serve.max_batch_delay_ms=0"])
    cfg = default_config().override(["serve.batch_size=1", "serve.max_batch_delay_ms=0"])
    assert (cfg.serve.batch_size, cfg.serve.max_batch_delay_ms) == (1, 0)


# --------------------------------------------------------------------------- #
# Error messages: one line, key and value
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("override,message", [
    ("train.lr=-1", "train.lr must be > 0, got -1"),
    ("model.variant=foo", "model.variant must be one of 'ms-sl++', 'ms-sl', 'mean-pool', got 'foo'"),
    ("train.epochs=x", "train.epochs must be an integer, got 'x'"),
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("nope.lr=1", "unknown config key 'nope.lr' (no section 'nope')"),
    ("train.lr", "override 'train.lr' is not of the form section.key=value"),
    ("lr=1", "config key 'lr' must be section.key"),
    ("train.epochs=1.5", "train.epochs must be an integer, got 1.5"),
    ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    ("train.batch_size=true", "train.batch_size must be an integer, got True"),
    ("train.lr=True", "train.lr must be a number, got True"),
    ("train.lr=abc", "train.lr must be a number, got 'abc'"),
    ("train.amp=1", "train.amp must be true or false, got 1"),
    ("train.amp=maybe", "train.amp must be true or false, got 'maybe'"),
    ("model.alpha=2", "model.alpha must be <= 1, got 2"),
    ("model.alpha=-0.1", "model.alpha must be >= 0, got -0.1"),
    ("model.dropout=1.0", "model.dropout must be < 1, got 1.0"),
    ("model.video_dim=-1", "model.video_dim must be >= 0, got -1"),
    ("text.precision=float16", "text.precision must be one of 'float32', 'bfloat16', got 'float16'"),
    ("search.backend=annoy", "search.backend must be one of 'exact', 'faiss', 'milvus', got 'annoy'"),
    ("search.dtype=int8", "search.dtype must be one of 'float32', 'float16', got 'int8'"),
    ("search.index_type=lsh", "search.index_type must be one of "
                              + ", ".join(repr(t) for t in ANN_INDEX_TYPES) + ", got 'lsh'"),
    ("search.refine_codes=pq0", "search.refine_codes must be arrays, fp16, sq8, sq6, sq4, rabitq<b> "
                                "(1 <= b <= 9 bits per dim) or pq<M> (M >= 1 bytes per clip), got 'pq0'"),
    ("search.refine_codes=fp8", "search.refine_codes must be arrays, fp16, sq8, sq6, sq4, rabitq<b> "
                                "(1 <= b <= 9 bits per dim) or pq<M> (M >= 1 bytes per clip), got 'fp8'"),
    ("train.device=gpu", "train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("train.lr=nan", "train.lr must be a finite number, got 'nan'"),
    ("train.betas=[0.9, 1.5]", "train.betas[1] must be < 1, got 1.5"),
    ("model.hidden_size=385", "model.hidden_size must be divisible by model.num_heads, got 385 and 4"),
    ("model.map_size=4", "model.cluster_num must be <= 10 (the spans of map_size 4) for ms-sl++, got 32"),
    ("model.length_enc_dim=255", "model.length_enc_dim must be a multiple of 2, got 255"),
    ("serve.top_k=5000", "serve.top_k must be <= serve.max_top_k (1000), got 5000"),
    ("search.frame_candidates=3", "unknown config key 'search.frame_candidates', a retired key"),
    ("text.max_tokens=5", "unknown config key 'text.max_tokens', a retired key"),
])
def test_bad_overrides_name_the_key_and_the_value(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert str(exc.value) == message


def test_several_problems_are_one_line_each():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.lr=-1", "train.epochs=x"])
    assert sorted(str(exc.value).splitlines()) == ["train.epochs must be an integer, got 'x'",
                                                   "train.lr must be > 0, got -1"]


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_missing_or_bad_params_file(tmp_path):
    with pytest.raises(ConfigError, match="^params file not found: .*missing.yaml$"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=r"list\.yaml must hold a mapping of sections"):
        load_config(listed)
    scalar_section = tmp_path / "section.yaml"
    scalar_section.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="config section 'train' must be a mapping, got 5"):
        load_config(scalar_section)


# --------------------------------------------------------------------------- #
# Checkpoints: to_dict / from_dict
# --------------------------------------------------------------------------- #
def test_from_dict_of_a_partial_dict_fills_in_the_packaged_values():
    cfg = Config.from_dict({"serve": {"top_k": 5}})
    expected = default_config()
    expected.serve.top_k = 5
    assert cfg == expected
    assert Config.from_dict({}) == Config.from_dict(None) == default_config()


def test_retired_keys_of_older_checkpoints_are_dropped():
    cfg = Config.from_dict({"search": {"frame_candidates": 100, "candidates": 40},
                            "text": {"max_tokens": 24, "batch_size": 64}})
    assert cfg.search.candidates == 40 and cfg.text.batch_size == 64
    assert "frame_candidates" not in cfg.to_dict()["search"] and "max_tokens" not in cfg.to_dict()["text"]
    with pytest.raises(ConfigError, match="^unknown config key 'search.frame_candidatez'$"):
        Config.from_dict({"search": {"frame_candidatez": 100}})
    with pytest.raises(ConfigError, match="^unknown config section 'nope'$"):
        Config.from_dict({"nope": {"x": 1}})


def test_refine_pq_m_of_older_configs_becomes_refine_codes():
    assert Config.from_dict({"search": {"refine_pq_m": 96}}).search.refine_codes == "pq96"
    assert Config.from_dict({"search": {"refine_pq_m": 96.0}}).search.refine_codes == "pq96"   # KFP floats
    assert Config.from_dict({"search": {"refine_pq_m": 0}}).search.refine_codes == "arrays"
    assert Config.from_dict({"search": {"refine_codes": "fp16", "refine_pq_m": 0}}).search.refine_codes == "fp16"
    assert load_config(None, ["search.refine_pq_m=8"]).search.refine_codes == "pq8"
    with pytest.raises(ConfigError, match=r"^search\.refine_pq_m must be an integer >= 0, got 1\.5$"):
        Config.from_dict({"search": {"refine_pq_m": 1.5}})


def test_kfp_style_whole_numbers_as_floats_load_as_integers():
    """Compiled KFP pipelines carry every number as a float (epochs: 100.0)."""
    d = default_config().to_dict()
    d["train"]["epochs"], d["model"]["map_size"] = 100.0, 32.0
    cfg = Config.from_dict(d)
    assert type(cfg.train.epochs) is int and type(cfg.model.map_size) is int and cfg == default_config()


def _plain(value) -> bool:
    if isinstance(value, dict):
        return type(value) is dict and all(type(k) is str and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return type(value) is list and all(_plain(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


def test_to_dict_is_plain_and_round_trips():
    cfg = load_config(None, ["model.video_dim=12", "model.text_dim=8", "search.refine_codes=pq8"])
    d = cfg.to_dict()
    assert _plain(d) and tuple(d) == SECTIONS
    assert Config.from_dict(d) == cfg and Config.from_dict(d).to_dict() == d


def test_config_round_trips_through_a_weights_only_checkpoint(tmp_path):
    cfg = load_config(None, ["model.video_dim=12", "model.text_dim=8", "serve.fps=25"])
    torch.save({"config": cfg.to_dict()}, tmp_path / "c.pt")
    back = Config.from_dict(torch.load(tmp_path / "c.pt", weights_only=True)["config"])
    assert back == cfg and back.model.video_dim == 12 and back.serve.fps == 25.0


# --------------------------------------------------------------------------- #
# Assignments are validated
# --------------------------------------------------------------------------- #
def test_valid_assignments_work_as_before():
    cfg, other = default_config(), default_config()
    cfg.model.video_dim, cfg.model.text_dim = np.int64(512), 384
    cfg.train.epochs = 3
    cfg.text.quantize = "none"
    cfg.text.precision = "bfloat16"
    other.data = cfg.data
    assert (cfg.model.video_dim, cfg.model.text_dim, cfg.train.epochs) == (512, 384, 3)
    assert type(cfg.model.video_dim) is int and other.data is cfg.data


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "epochs", 0, "train.epochs must be >= 1, got 0"),
    ("train", "epochs", 2.5, "train.epochs must be an integer, got 2.5"),
    ("train", "lr", -1, "train.lr must be > 0, got -1"),
    ("model", "variant", "bert", "model.variant must be one of 'ms-sl++', 'ms-sl', 'mean-pool', got 'bert'"),
    ("model", "map_size", 4, "model.cluster_num must be <= 10 (the spans of map_size 4) for ms-sl++, got 32"),
    ("train", "lrr", 1, "unknown config key 'train.lrr'"),
])
def test_a_bad_assignment_is_refused_and_leaves_the_value(section, key, value, message):
    cfg = default_config()
    with pytest.raises(ConfigError) as exc:
        setattr(getattr(cfg, section), key, value)
    assert str(exc.value) == message
    assert cfg == default_config()


def test_a_bad_section_assignment_is_refused():
    cfg = default_config()
    with pytest.raises(ConfigError, match="^data must be a mapping of keys, got 5$"):
        cfg.data = 5
    with pytest.raises(ConfigError, match="^unknown config section 'nope'$"):
        cfg.nope = default_config().data
    assert cfg == default_config()


def test_replace_validates_all_changes_together():
    model = default_config().model
    small = model.replace(map_size=4, cluster_num=8, video_dim=24, text_dim=16)
    assert isinstance(small, ModelConfig) and (small.map_size, small.cluster_num, small.video_dim) == (4, 8, 24)
    assert model.map_size == 32
    with pytest.raises(ConfigError, match="^model.cluster_num must be <= 10"):
        model.replace(map_size=4)
    hnsw = default_config().search.replace(index_type="hnsw")
    assert isinstance(hnsw, SearchConfig) and hnsw.index_type == "hnsw"


def test_module_constants():
    assert ANN_INDEX_TYPES == ("flat", "ivf", "hnsw", "ivfpq", "ivfpqfs")
    assert all(REFINE_CODES.fullmatch(c) for c in ("arrays", "fp16", "sq8", "pq8", "pq96"))
    assert not any(REFINE_CODES.fullmatch(c) for c in ("pq0", "fp8", "pq", "arrays2"))
