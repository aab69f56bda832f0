"""prvr.stages: the pipeline steps as plain functions (and their `prvr stage` commands)."""
from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from prvr import stages
from prvr.cli import stage as stage_cli
from prvr.config import load_config
from prvr.collection import Collection
from prvr.errors import DataError, PrvrError
from prvr.monitoring import GATEWAY_ENV
from prvr.registry import Registry
from prvr.reports import format_decision

# A small model so a tiny-preset epoch takes seconds on 2 CPU cores.
FAST = ["model.hidden_size=64", "model.map_size=8", "model.cluster_num=8", "model.max_ctx_len=32",
        "model.kmedoids_iters=10", "train.epochs=1"]


class FakeEncoder:
    """Deterministic stand-in for the MiniLM encoder: (L, 8) features per sentence."""
    name, max_tokens, dim = "fake-encoder:1", 30, 8

    def encode(self, sentences, batch_size=128):
        return [np.full((min(len(s.split()), 30), 8), len(s) / 100.0, np.float32) for s in sentences]


@pytest.fixture
def cfg():
    return load_config(overrides=FAST)


# ----------------------------------------------------------------------------- preprocess
def test_parse_source(cfg) -> None:
    assert stages.parse_source("synth:tiny", cfg) == ("synth", "tiny", cfg.synth.seed, None)
    assert stages.parse_source("synth:small:7", cfg) == ("synth", "small", 7, None)
    assert stages.parse_source("data/tvr", cfg) == ("path", None, None, Path("data/tvr"))
    for bad in ("synth:", "synth:tiny:x", "synth:a:1:2"):
        with pytest.raises(DataError, match="synth:"):
            stages.parse_source(bad, cfg)


def test_preprocess_synth_writes_collection_features_and_record(tmp_path: Path, cfg) -> None:
    record = stages.preprocess("synth:tiny:3", tmp_path / "ds", cfg, encoder=FakeEncoder())
    coll_dir = tmp_path / "ds" / cfg.data.collection
    assert (coll_dir / "TextData" / f"roberta_{cfg.data.collection}_query_feat.hdf5").is_file()
    on_disk = json.loads((tmp_path / "ds" / stages.DATASET_JSON).read_text())
    assert on_disk == record
    assert record["path"] == cfg.data.collection            # relative to the dataset folder
    assert record["encoded_text"] is True and record["text_encoder"] == FakeEncoder.name
    assert record["stats"]["splits"]["train"]["videos"] == 80 and record["stats"]["text_dim"] == 8
    # the record is enough to find everything again, even after the folder moves
    shutil.move(tmp_path / "ds", tmp_path / "moved")
    path, cfg2, rec = stages.load_dataset(tmp_path / "moved", cfg)
    assert path == (tmp_path / "moved" / cfg.data.collection).resolve()
    assert rec["fingerprint"] == record["fingerprint"] and re.fullmatch(r"[0-9a-f]{32}", rec["fingerprint"])
    assert Collection(path, cfg2.data.video_feature, cfg2.data.text_feature_file).text_dim == 8
    assert cfg.data.text_feature_file is None                 # the caller's config is untouched


def test_preprocess_readonly_source_puts_hdf5_into_out_dir(tmp_path: Path, tiny_collection: Path,
                                                           cfg, monkeypatch) -> None:
    src = shutil.copytree(tiny_collection, tmp_path / "src" / "tiny")
    monkeypatch.setattr(stages, "_writable", lambda folder: False)     # a read-only mount
    record = stages.preprocess(str(src), tmp_path / "ds", cfg, encoder=FakeEncoder())
    hdf5 = tmp_path / "ds" / "roberta_tiny_query_feat.hdf5"
    assert hdf5.is_file() and not list((src / "TextData").glob("*.hdf5"))
    assert record["abs_text_feature_file"] == str(hdf5.resolve())
    # Collection accepts the absolute file name in place of TextData/<file>
    path, cfg2, _ = stages.load_dataset(tmp_path / "ds", cfg)
    assert Path(cfg2.data.text_feature_file).is_absolute()
    coll = Collection(path, cfg2.data.video_feature, cfg2.data.text_feature_file)
    assert coll.text_feature_path == hdf5.resolve() and coll.text_dim == 8


def test_preprocess_keeps_existing_features_and_reports_bad_data(tmp_path: Path, toy_collection: Path,
                                                                 cfg) -> None:
    class Boom(FakeEncoder):
        def encode(self, *a, **k):
            raise AssertionError("features exist: nothing to encode")

    record = stages.preprocess(str(toy_collection), tmp_path / "ds", cfg, encoder=Boom())
    assert not record["encoded_text"] and record["stats"]["text_dim"] == 8
    (toy_collection / "FeatureData" / "i3d" / "shape.txt").write_text("9 7\n")
    with pytest.raises(DataError, match="shape.txt"):
        stages.preprocess(str(toy_collection), tmp_path / "ds2", cfg, encoder=Boom())
    with pytest.raises(DataError, match="not found"):
        stages.load_dataset(tmp_path / "nowhere", cfg)


# ----------------------------------------------------------------------------- train / evaluate / register
# `trained` (tests/conftest.py): one preprocess + 1-epoch training with FAST, shared with test_gate.py.


def test_train_step_writes_run_folder(trained: dict) -> None:
    run, result = trained["root"] / "run", trained["result"]
    assert result["epochs"] == 1 and result["best_sumr"] > 0 and result["nproc"] == 1
    for name in ("model.pt", "last.pt", "train_summary.json", "params.yaml", stages.RESUME_JSON):
        assert (run / name).is_file(), name
    assert (run / "dvclive" / "plots" / "metrics").is_dir()


def test_train_step_resumes_same_run_and_restarts_changed_one(trained: dict, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained["root"] / "run", run)
    same = stages.train_step(trained["root"] / "ds", run, trained["cfg"])
    assert same["history"] == trained["result"]["history"]          # resumed: nothing retrained
    assert "resuming" in capsys.readouterr().err
    changed = load_config(overrides=FAST + ["train.seed=7"])
    other = stages.train_step(trained["root"] / "ds", run, changed, keep_last=False)
    assert "starting over" in capsys.readouterr().err
    assert other["history"][0]["loss"] != trained["result"]["history"][0]["loss"]
    assert not (run / "last.pt").exists() and (run / "model.pt").is_file()


def test_train_step_torchrun_two_processes(trained: dict, tmp_path: Path) -> None:
    result = stages.train_step(trained["root"] / "ds", tmp_path / "ddp", trained["cfg"], nproc=2)
    assert result["nproc"] == 2 and result["epochs"] == 1 and (tmp_path / "ddp" / "model.pt").is_file()


def test_evaluate_step_writes_metrics_plots_and_reports(trained: dict, tmp_path: Path) -> None:
    out = stages.evaluate_step(trained["root"] / "ds", trained["root"] / "run", tmp_path / "ev", trained["cfg"])
    m = out["metrics"]
    assert {"fused", "clip", "frame"} <= set(m) and m["split"] == "test"
    assert json.loads(Path(out["metrics_file"]).read_text())["fused"]["sumr"] == m["fused"]["sumr"]
    assert sorted(Path(p).name for p in out["plots"]) == ["recall_at_k.png", "sumr_by_mv.png"]
    page = Path(out["html"]).read_text()
    assert page.count('src="data:image/png;base64,') == 2 and "SumR per moment/video length bin" in page
    b64 = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    md = Path(out["markdown"]).read_text()
    assert "| fused |" in md and "| M/V bin |" in md
    flat = stages.kfp_metrics(m)                    # 7 numbers of each score + the corpus size
    assert len(flat) == 23 and (flat["num_queries"], flat["num_videos"]) == (m["num_queries"], m["num_videos"])
    assert (flat["fused_sumr"], flat["clip_r1"], flat["frame_r100"], flat["fused_medr"]) == \
        (m["fused"]["sumr"], m["clip"]["r1"], m["frame"]["r100"], m["fused"]["medr"])


def test_register_step_gate_and_decision_file(trained: dict, tmp_path: Path) -> None:
    root, cfg = trained["root"], trained["cfg"]
    ev = stages.evaluate_step(root / "ds", root / "run", tmp_path / "ev", cfg)
    uri = f"file://{tmp_path / 'registry'}"
    first = stages.register_step(root / "run", ev["metrics_file"], root / "ds", cfg, uri, 0.0,
                                 out_dir=tmp_path / "reg")
    assert first["promoted"] and first["version"] == "v0001" and "no production" in first["reason"]
    assert json.loads((tmp_path / "reg" / "decision.json").read_text())["version"] == "v0001"
    manifest = Registry(uri).show(cfg.registry.model_name, "v0001")
    assert {"model.pt", "metrics.json"} <= set(manifest["files"])
    assert manifest["data_version"] == first["data_version"] and first["data_version"].startswith("md5:")
    assert first["index"] is True                                     # build_index defaults to on
    assert "index/manifest.json" in manifest["files"] and "index/clips.npy" in manifest["files"]
    # serve.corpus (default all): the served index holds every video of the collection, not a split
    index = json.loads((tmp_path / "reg" / "index" / "manifest.json").read_text())
    path, _, _ = stages.load_dataset(root / "ds", cfg)
    assert index["corpus"] == "all" and index["corpus_size"] == len(Collection(path).all_videos())
    assert index["corpus_size"] > len(Collection(path).videos("test"))
    assert index["data_version"] == first["data_version"]
    source = json.loads((root / "ds" / stages.DATASET_JSON).read_text())["source"]
    assert manifest["decision"]["outcome"] == "promoted" and manifest["source"] == source
    # the same model again (metrics as a dict): production, evaluated on this same split, scores
    # exactly what the candidate does, so it does not beat it by the margin; still registered
    second = stages.register_step(root / "run", ev["metrics"], root / "ds", cfg, uri, 0.5,
                                  out_dir=tmp_path / "reg2", build_index=False)
    assert not second["promoted"] and second["version"] == "v0002" and second["outcome"] == "not better"
    assert "does not beat production v0001" in second["reason"]
    assert "on the test split of this data" in second["reason"]
    assert second["production"] == pytest.approx(second["candidate"])
    assert "registered v0002, not promoted" in format_decision(second)
    assert Registry(uri).show(cfg.registry.model_name, "v0002")["decision"]["reason"] == second["reason"]
    assert Registry(uri).production(cfg.registry.model_name) == "v0001" and "archive" not in second
    with pytest.raises(PrvrError, match="checkpoint not found"):
        stages.register_step(tmp_path / "none", ev["metrics"], root / "ds", cfg, uri, 0.0)


def test_register_step_builds_the_faiss_index_the_served_config_needs(trained: dict, tmp_path: Path) -> None:
    """search.backend faiss: the registered index carries faiss.index with the configured
    re-score codes, so serving workers load it instead of training one."""
    root = trained["root"]
    cfg = trained["cfg"].replace(search=trained["cfg"].search.replace(backend="faiss", pq_m=8,
                                                                      refine_codes="fp16"))
    ev = stages.evaluate_step(root / "ds", root / "run", tmp_path / "ev", cfg)
    uri = f"file://{tmp_path / 'registry'}"
    out = stages.register_step(root / "run", ev["metrics"], root / "ds", cfg, uri, 0.0, out_dir=tmp_path / "reg")
    assert out["promoted"] and "faiss ivfpqfs" in out["index_note"]
    manifest = json.loads((tmp_path / "reg" / "index" / "manifest.json").read_text())
    assert manifest["ann"]["index_type"] == "ivfpqfs" and manifest["ann"]["refine_codes"] == "fp16"
    assert "index/faiss.index" in Registry(uri).show(cfg.registry.model_name, out["version"])["files"]



def _gateway_groups(text: str) -> dict[str, dict[str, tuple[float, dict[str, str]]]]:
    """{job: {metric: (value, other labels)}} of the prvr_run_* gauges and push times a
    Pushgateway's /metrics exposes (parsed by prometheus_client's own text parser)."""
    groups: dict[str, dict[str, tuple[float, dict[str, str]]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("prvr_run_") or sample.name == "push_time_seconds":
                labels = {k: v for k, v in sample.labels.items() if k not in ("job", "instance")}
                groups.setdefault(sample.labels["job"], {})[sample.name] = (sample.value, labels)
    return groups


@pytest.mark.integration
def test_stages_push_run_metrics_to_a_real_pushgateway(trained: dict, tmp_path: Path, monkeypatch,
                                                       pushgateway) -> None:
    """preprocess, evaluate and register each push their numbers, grouped by job, collection and
    variant, to the gateway $PRVR_PUSHGATEWAY names; read back from its /metrics."""
    monkeypatch.setenv(GATEWAY_ENV, pushgateway.address)
    root, cfg = trained["root"], trained["cfg"]
    t0 = time.time()
    record = stages.preprocess("synth:tiny:3", tmp_path / "ds", cfg, encoder=FakeEncoder())
    ev = stages.evaluate_step(root / "ds", root / "run", tmp_path / "ev", cfg)
    reg = stages.register_step(root / "run", ev["metrics"], root / "ds", cfg, f"file://{tmp_path / 'registry'}",
                               0.0, out_dir=tmp_path / "reg", build_index=False)
    groups = _gateway_groups(pushgateway.metrics_text())
    assert set(groups) == {"prvr-preprocess", "prvr-evaluate", "prvr-register"}, groups
    splits = record["stats"]["splits"].values()
    m = ev["metrics"]
    expected = {
        "prvr-preprocess": {"videos": sum(s["videos"] for s in splits), "queries": sum(s["queries"] for s in splits)},
        "prvr-evaluate": {"duration_seconds": ev["duration_seconds"], "num_queries": m["num_queries"],
                          "num_videos": m["num_videos"],
                          **{f"{s}_{k}": m[s][k] for s in ("fused", "clip", "frame")
                             for k in ("r1", "r5", "r10", "r100", "sumr", "medr", "mnr")}},
        "prvr-register": {"duration_seconds": reg["duration_seconds"], "promoted": 1.0,
                          "candidate_sumr": reg["candidate"]},
    }
    labels = {"collection": cfg.data.collection, "variant": "ms-sl++"}
    preprocess_seconds, _ = groups["prvr-preprocess"].pop("prvr_run_duration_seconds")   # not returned
    assert 0 < preprocess_seconds < time.time() - t0
    for job, values in expected.items():
        got = groups[job]
        # the time of the job's last success, which the stale-pipeline alert watches
        assert t0 <= got.pop("prvr_run_last_success_timestamp_seconds")[0] <= time.time(), job
        pushed = {name.removeprefix("prvr_run_"): value for name, (value, _) in got.items()
                  if name.startswith("prvr_run_")}
        assert pushed == pytest.approx(values, rel=1e-12), job
        assert all(lab == labels for _, lab in got.values()), (job, got)
        assert t0 - 1 <= got["push_time_seconds"][0] <= time.time() + 1, job
    assert expected["prvr-preprocess"]["videos"] >= 80 and expected["prvr-evaluate"]["num_queries"] > 0


# ----------------------------------------------------------------------------- CLI and config helpers
def _cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prvr")
    stage_cli.register_cli(parser.add_subparsers(dest="command"))
    return parser


def test_stage_cli_runs_evaluate_and_register(trained: dict, tmp_path: Path, capsys) -> None:
    root = trained["root"]
    sets = sum((["--set", s] for s in FAST), [])
    args = _cli().parse_args(["stage", "evaluate", "--dataset", str(root / "ds"), "--model", str(root / "run"),
                              "--out", str(tmp_path / "ev"), "--metrics", str(tmp_path / "m.json"), *sets])
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    m = json.loads((tmp_path / "m.json").read_text())
    assert out[0] == f"test: {m['num_queries']} queries x {m['num_videos']} videos (ms-sl++)"
    fused = m["fused"]
    assert out[2].split() == ["fused", *(f"{fused[k]:.1f}" for k in ("r1", "r5", "r10", "r100", "sumr", "medr", "mnr"))]
    assert out[-1] == f"report: {tmp_path / 'ev' / 'report.html'}" and (tmp_path / "ev" / "report.html").is_file()
    args = _cli().parse_args(["stage", "register", "--dataset", str(root / "ds"), "--model", str(root / "run"),
                              "--metrics", str(tmp_path / "m.json"), "--out", str(tmp_path / "reg"),
                              "--uri", f"file://{tmp_path / 'registry'}", "--no-index", *sets])
    assert args.func(args) == 0
    assert "promoted v0001" in capsys.readouterr().out
    # --no-promote (what dvc.yaml runs): registered with the decision, production never moves
    args = _cli().parse_args(["stage", "register", "--dataset", str(root / "ds"), "--model", str(root / "run"),
                              "--metrics", str(tmp_path / "m.json"), "--out", str(tmp_path / "reg2"),
                              "--uri", f"file://{tmp_path / 'registry'}", "--no-index", "--no-promote",
                              "--margin", "-1", *sets])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "registered v0002, not promoted" in out
    assert "promotion is explicit here: prvr registry promote --version v0002" in out
    assert "beats production v0001" in out                          # the gate's verdict, on record
    reg = Registry(f"file://{tmp_path / 'registry'}")
    assert reg.production(trained["cfg"].registry.model_name) == "v0001"
    assert reg.list(trained["cfg"].registry.model_name)[1]["decision"] == "held"
    assert not (tmp_path / "reg2" / "model_store").exists()


def test_stage_config_and_pipeline_params_round_trip(cfg) -> None:
    params = stages.pipeline_params(cfg)
    assert all(v is not None for section in params.values() for v in section.values())
    again = stages.stage_config(params, ["train.lr=0.5"])
    assert again.train.lr == 0.5 and again.model.hidden_size == 64 and again.data.video_feature is None
    assert stages.stage_config(None, ["train.epochs=3"]).train.epochs == 3
