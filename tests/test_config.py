"""The typed config: params.yaml is the single source; overrides are typed and checked."""
import pytest
import torch

from prvr.config import Config, ConfigError, load_config


def test_repository_params_load_and_hold_the_paper_defaults():
    cfg = load_config()
    assert cfg.model.variant == "ms-sl++" and cfg.model.alpha == 0.7
    assert cfg.model.map_size == 32 and cfg.model.cluster_num == 32 and cfg.model.max_ctx_len == 128
    assert cfg.train.margin == 0.2 and cfg.train.hard_pool_size == 20 and cfg.train.seed == 2018
    assert (cfg.train.w_nce_clip, cfg.train.w_nce_frame) == (0.02, 0.04)


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-4", "model.variant=ms-sl", "train.amp=true",
                             "train.betas=[0.8, 0.9]", "search.milvus_uri=null"])
    assert cfg.train.lr == 1e-4 and cfg.model.variant == "ms-sl" and cfg.train.amp is True
    assert cfg.train.betas == [0.8, 0.9] and cfg.search.milvus_uri is None


@pytest.mark.parametrize("override,message", [
    ("train.nope=1", "unknown config key"), ("nope.lr=1", "unknown config section"),
    ("train.epochs=1.5", "integer"), ("model.variant=bert", "model.variant"),
    ("model.alpha=2", "alpha"), ("train.lr", "section.key=value"),
    ("search.refine_codes=pq0", "refine_codes"), ("search.refine_codes=fp8", "refine_codes"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_retired_keys_of_older_checkpoints_are_ignored():
    """search.frame_candidates (centroid candidates, before fused-vector ANN) still loads."""
    cfg = Config.from_dict({"search": {"frame_candidates": 100, "candidates": 40}})
    assert cfg.search.candidates == 40 and not hasattr(cfg.search, "frame_candidates")
    with pytest.raises(ConfigError, match="unknown config key"):
        Config.from_dict({"search": {"frame_candidatez": 100}})


def test_refine_pq_m_of_older_configs_becomes_refine_codes():
    assert Config.from_dict({"search": {"refine_pq_m": 96}}).search.refine_codes == "pq96"
    assert Config.from_dict({"search": {"refine_pq_m": 0}}).search.refine_codes == "arrays"
    assert Config.from_dict({"search": {"refine_codes": "fp16", "refine_pq_m": 0}}).search.refine_codes == "fp16"
    assert load_config(None, ["search.refine_pq_m=8"]).search.refine_codes == "pq8"


def test_cwd_params_file_wins(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 7\n")
    monkeypatch.chdir(tmp_path)
    assert load_config().train.epochs == 7


def test_missing_or_bad_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_config_round_trips_through_a_weights_only_checkpoint(tmp_path):
    cfg = load_config(None, ["model.video_dim=12", "model.text_dim=8"])
    torch.save({"config": cfg.to_dict()}, tmp_path / "c.pt")
    back = Config.from_dict(torch.load(tmp_path / "c.pt", weights_only=True)["config"])
    assert back == cfg
