"""The promotion gate like for like (prvr.stages.register_step): production is evaluated on the
candidate's own test split and the decision rests on those two numbers; a production that cannot
be evaluated there blocks promotion; every candidate is registered with its decision; and
--no-promote (what dvc.yaml runs) never moves the production pointer.

Models: P = the shared `trained` fixture (tiny synthetic collection A, seed 2018), C = the same
small model trained on collection B (tiny, seed 7: another synthetic world), M = one trained on a
micro collection with 16-d video features. One epoch of these small models leaves both P and C
near chance on B, so which of them scores higher there is measured (`winner`), not assumed."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from prvr import stages, synth
from prvr.cli.registry import register_cli
from prvr.evaluate import evaluate
from prvr.registry import Registry

MICRO = synth.Preset({"train": 16, "val": 4, "test": 6}, 16, (8, 12, 20), (2, 3), "synth_feat")


@pytest.fixture(scope="module")
def models(trained: dict, text_encoder, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Datasets A, B, micro; runs P, C, M; their test evaluations keyed (run, dataset)."""
    root, cfg = tmp_path_factory.mktemp("gate"), trained["cfg"]
    stages.preprocess("synth:tiny:7", root / "dsB", cfg, encoder=text_encoder)
    stages.train_step(root / "dsB", root / "runC", cfg, keep_last=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(synth.PRESETS, "micro", MICRO)
        stages.preprocess("synth:micro:3", root / "dsM", cfg, encoder=text_encoder)
    stages.train_step(root / "dsM", root / "runM", cfg, keep_last=False)
    runs = {"P": trained["root"] / "run", "C": root / "runC", "M": root / "runM"}
    data = {"A": trained["root"] / "ds", "B": root / "dsB", "M": root / "dsM"}
    ev = {(r, d): stages.evaluate_step(data[d], runs[r], root / f"ev{r}{d}", cfg)
          for r, d in [("P", "A"), ("C", "B"), ("P", "B"), ("M", "M")]}
    on_b = {r: ev[(r, "B")]["metrics"]["fused"]["sumr"] for r in "PC"}
    assert on_b["P"] != on_b["C"], on_b
    winner = max(on_b, key=on_b.get)
    return {"cfg": cfg, "runs": runs, "data": data, "ev": ev, "win": winner, "lose": "PC".replace(winner, "")}


def _uri(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'registry'}"


def _register(models: dict, run: str, ds: str, tmp_path: Path, **kw) -> dict:
    """register_step of ``run`` with its metrics on ``ds``'s test split (no index unless asked)."""
    out = tmp_path / f"reg-{run}{ds}-{len(list(tmp_path.glob('reg-*')))}"
    return stages.register_step(models["runs"][run], models["ev"][(run, ds)]["metrics_file"], models["data"][ds],
                                models["cfg"], _uri(tmp_path), out_dir=out, **{"build_index": False, **kw})


def _sumr(models: dict, run: str, ds: str) -> float:
    """An independent evaluation of ``run``'s checkpoint on ``ds``'s test split."""
    path, cfg, _ = stages.load_dataset(models["data"][ds], models["cfg"])
    return evaluate(cfg, path, models["runs"][run] / "model.pt", "test")["fused"]["sumr"]


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="prvr")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_gate_evaluates_production_on_the_candidates_split(models: dict, tmp_path: Path, capsys) -> None:
    name, win, lose = models["cfg"].registry.model_name, models["win"], models["lose"]
    reg = Registry(_uri(tmp_path))
    # production: the model that scores lower on B, on record with a SumR measured on other
    # ("real") data that no split can reach (at most 400): stored numbers would never promote
    v1 = reg.register(name, {"model.pt": models["runs"][lose] / "model.pt"}, {"fused": {"sumr": 399.0}},
                      data_version="md5:real", source="/mnt/data/tvr")
    reg.promote(name, v1)
    d = _register(models, win, "B", tmp_path, margin=0.0)
    assert d["production"] == pytest.approx(_sumr(models, lose, "B")) and d["production"] < 399.0
    assert d["candidate"] == pytest.approx(models["ev"][(win, "B")]["metrics"]["fused"]["sumr"])
    assert (d["production_version"], d["split"], d["margin"]) == (v1, "test", 0.0)
    assert d["candidate"] > d["production"] and d["promoted"] and d["outcome"] == "promoted"
    assert d["reason"].startswith("promoted v0002: sumr ") and "on the test split of this data" in d["reason"]
    assert reg.production(name) == "v0002"
    manifest = reg.show(name, "v0002")
    record = {k: d[k] for k in ("promoted", "outcome", "reason", "candidate", "production",
                                "production_version", "margin", "split")}
    assert manifest["decision"] == {**manifest["decision"], **record}
    assert manifest["source"] == "synth:tiny:7" and manifest["data_version"] == d["data_version"]
    assert manifest["metrics"]["fused"]["sumr"] == d["candidate"]

    # the other one as a candidate on B: production, evaluated by the gate on B's split, scores
    # what its own evaluation did; the candidate does not beat it: rejected, but on record
    e = _register(models, lose, "B", tmp_path, margin=0.0)
    assert e["production"] == pytest.approx(d["candidate"]) and e["candidate"] == pytest.approx(d["production"])
    assert not e["promoted"] and e["outcome"] == "not better" and e["version"] == "v0003"
    assert reg.production(name) == "v0002"
    # P on its own collection A: production is evaluated on A's split; the decision follows those numbers
    f = _register(models, "P", "A", tmp_path, margin=0.0)
    assert f["production"] == pytest.approx(_sumr(models, win, "A")) and f["production_version"] == "v0002"
    assert f["promoted"] == (f["candidate"] > f["production"])
    assert reg.production(name) == ("v0004" if f["promoted"] else "v0002")

    rows = {r["version"]: r for r in reg.list(name)}
    assert [rows[v]["decision"] for v in sorted(rows)] == [None, "promoted", "not better", f["outcome"]]
    assert "does not beat production v0002" in rows["v0003"]["reason"]
    assert run_cli(["registry", "list", "--uri", _uri(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "decision" in table and "not better" in table
    assert run_cli(["registry", "show", "--uri", _uri(tmp_path), "--version", "v0003"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["decision"]["production"] == e["production"] and shown["source"] == "synth:tiny:7"


def test_production_that_cannot_be_evaluated_here_blocks_promotion(models: dict, tmp_path: Path) -> None:
    name = models["cfg"].registry.model_name
    reg = Registry(_uri(tmp_path))
    m = _register(models, "M", "M", tmp_path)                              # 16-d video features
    assert m["promoted"] and "no production model yet" in m["reason"]
    d = _register(models, "C", "B", tmp_path, margin=0.0)
    assert not d["promoted"] and d["outcome"] == "not comparable" and d["version"] == "v0002"
    assert d["reason"].startswith("registered v0002, not promoted: production v0001 cannot be evaluated on "
                                  "this data: video features of ")
    assert "are 64-d, the checkpoint expects 16-d" in d["reason"] and d["production"] is None
    assert reg.production(name) == "v0001" and "archive" not in d
    assert reg.show(name, "v0002")["decision"]["reason"] == d["reason"]
    # a production version without a model.pt cannot be evaluated either
    metrics = models["ev"][("C", "B")]
    v3 = reg.register(name, {"metrics.json": Path(metrics["metrics_file"])}, metrics["metrics"])
    reg.promote(name, v3)
    e = _register(models, "C", "B", tmp_path, margin=0.0)
    assert not e["promoted"] and e["version"] == "v0004" and e["production_version"] == v3
    assert "production v0003 cannot be evaluated on this data: the version has no model.pt" in e["reason"]
    assert [r["decision"] for r in reg.list(name)] == ["promoted", "not comparable", None, "not comparable"]
    assert reg.production(name) == v3


def test_no_promote_registers_and_never_moves_production(models: dict, tmp_path: Path) -> None:
    name = models["cfg"].registry.model_name
    reg = Registry(_uri(tmp_path))
    d = _register(models, models["lose"], "B", tmp_path, promote=False, build_index=True)
    assert not d["promoted"] and d["outcome"] == "held" and d["version"] == "v0001"
    assert "promotion is explicit here: prvr registry promote --version v0001" in d["reason"]
    assert reg.production(name) is None and d["index"] and "archive" not in d
    assert not list(tmp_path.glob("reg-*/model_store"))
    reg.promote(name, "v0001")
    # even a candidate the gate finds better on this split stays a candidate
    e = _register(models, models["win"], "B", tmp_path, promote=False)
    assert not e["promoted"] and e["outcome"] == "held" and "beats production v0001" in e["reason"]
    assert e["production"] < e["candidate"] and reg.production(name) == "v0001"
    assert reg.show(name, "v0002")["decision"] == {**reg.show(name, "v0002")["decision"], "outcome": "held",
                                                    "reason": e["reason"]}
