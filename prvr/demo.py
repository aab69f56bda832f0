"""`prvr demo`: the training pipeline end to end on built-in synthetic data.

Runs the Kubeflow pipeline (pipelines/prvr_pipeline.py) locally with kfp's SubprocessRunner
(or, with ``--no-pipeline``, the same stage functions directly), then prints the
data summary, the test metrics and the registry's promotion decision.

Usage::

    prvr demo                        # small preset, runs/kfp, registry file://registry
    prvr demo --preset tiny --epochs 2 --no-pipeline
"""
from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import kfp.local

from prvr import stages
from prvr.collection import Collection, format_stats
from prvr.config import Config
from prvr.errors import PrvrError
from prvr.archive import build_archive
from prvr.server import TorchServe
from prvr.registry import Registry
from prvr.reports import format_decision, format_table

__all__ = ["run_pipeline", "run_stages", "print_summary", "serve_and_query", "print_answers",
           "DEMO_EPOCHS"]

# Measured on the small preset, 2 idle CPU cores: preprocess (synth + encoding 5013 queries)
# ~40 s, one MS-SL++ epoch ~25 s (42 videos/s) with validation, evaluate + register + serve
# ~40 s; 5 epochs took 2.6 min end to end (test SumR 199). Ten epochs keep the demo near
# five minutes with a clearly trained model; pass --epochs to change it.
DEMO_EPOCHS = 10
PIPELINE_FILE = Path(__file__).resolve().parent.parent / "pipelines" / "prvr_pipeline.py"


def _file_uri(uri: str) -> str:
    """file://relative -> file:///absolute (pipeline tasks may run in another directory)."""
    if uri.startswith("file://"):
        return "file://" + str(Path(uri[len("file://"):]).expanduser().resolve())
    if "://" not in uri:
        return "file://" + str(Path(uri).expanduser().resolve())
    return uri


def _load_pipeline() -> Any:
    if not PIPELINE_FILE.is_file():
        raise PrvrError(f"the demo runs the Kubeflow pipeline of a source checkout ({PIPELINE_FILE} is "
                        "missing); run it there or use --no-pipeline")
    root = str(PIPELINE_FILE.parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("pipelines.prvr_pipeline").prvr_pipeline


def _read(path: str | Path, name: str) -> dict[str, Any]:
    return json.loads((Path(path) / name).read_text())


def run_pipeline(cfg: Config, preset: str, epochs: int, pipeline_root: str | Path = "runs/kfp",
                 registry_uri: str = "file://registry", overrides: list[str] | None = None) -> dict[str, Any]:
    """One local run of the whole Kubeflow pipeline; returns {dataset, metrics, decision, ...}."""
    pipeline = _load_pipeline()
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    task = pipeline(source=f"synth:{preset}:{cfg.synth.seed}", variant=cfg.model.variant, epochs=epochs,
                    alpha=cfg.model.alpha, registry_uri=_file_uri(registry_uri),
                    endpoint_url=cfg.registry.endpoint_url or "",
                    promotion_margin=cfg.registry.promotion_margin, params_overrides=list(overrides or []),
                    base_params=stages.pipeline_params(cfg))
    out = task.outputs
    return {"dataset": _read(out["dataset"].path, stages.DATASET_JSON),
            "metrics": _read(out["evaluation"].path, "metrics.json"),
            "decision": _read(out["decision"].path, stages.DECISION_JSON),
            "report": str(Path(out["evaluation"].path) / "report.html"),
            "run_dir": str(Path(out["dataset"].path).parent.parent)}


def run_stages(cfg: Config, preset: str, epochs: int, out_dir: str | Path = "runs/demo",
               registry_uri: str = "file://registry") -> dict[str, Any]:
    """The same four stages, called in this process (no Kubeflow)."""
    cfg.train.epochs = epochs
    out = Path(out_dir)
    dataset = stages.preprocess(f"synth:{preset}:{cfg.synth.seed}", out / "dataset", cfg)
    stages.train_step(out / "dataset", out / "train", cfg, resume=False, progress=sys.stderr.isatty())
    ev = stages.evaluate_step(out / "dataset", out / "train", out / "evaluate", cfg)
    decision = stages.register_step(out / "train", ev["metrics_file"], out / "dataset", cfg,
                                    _file_uri(registry_uri), out_dir=out / "register")
    return {"dataset": dataset, "metrics": ev["metrics"], "decision": decision, "report": ev["html"],
            "run_dir": str(out)}


def print_summary(result: dict[str, Any], seconds: float) -> None:
    m = result["metrics"]
    print("\n== data ==")
    print(format_stats(result["dataset"]["stats"]))
    print(f"\n== {m['split']} metrics: {m['num_queries']} queries x {m['num_videos']} videos "
          f"({m['variant']}, epoch {m.get('epoch')}) ==")
    print(format_table(m))
    print("\n== registry ==")
    print(format_decision(result["decision"]))
    print(f"\nreport: {result['report']}\nrun: {result['run_dir']}  ({seconds:.0f} s)")


def serve_and_query(cfg: Config, result: dict[str, Any], registry_uri: str,
                    workdir: str | Path = "runs/demo-serve", queries: int = 2) -> list[dict[str, Any]]:
    """Package the production model, start TorchServe on free loopback ports, ask typed queries.

    The queries are test captions of the demo collection, so the answer can be checked
    against the video they were written for. The server is stopped before returning."""
    reg = Registry(_file_uri(registry_uri), endpoint_url=cfg.registry.endpoint_url)
    name = cfg.registry.model_name
    version = reg.production(name)
    if version is None:
        raise PrvrError(f"registry {registry_uri} has no production version of {name} to serve")
    work = Path(workdir).resolve()
    made = result["decision"].get("archive")
    if result["decision"].get("version") == version and made and Path(made).is_file():
        mar = Path(made)  # the register step already packaged this production version
    else:
        pulled = reg.pull(name, version, work / "pulled" / version)
        mar = build_archive(pulled / "model.pt", pulled / "index", work / "model_store", version,
                            "prvr", cfg)
    coll = Collection(result["dataset"]["abs_path"])
    captions = coll.captions("test")[:queries]
    answers = []
    with TorchServe(work, mar.parent, {"prvr": mar.name}, free_ports=True) as server:
        for cap in captions:
            r = server.infer({"query": cap.text, "top_k": 3})
            r.raise_for_status()
            answers.append({"query": cap.text, "true_video": cap.video_id, "answer": r.json()})
    return answers


def print_answers(answers: list[dict[str, Any]]) -> None:
    print("\n== served by TorchServe (REST, token auth) ==")
    for a in answers:
        body = a["answer"]
        print(f"query: {a['query']!r}  (written for {a['true_video']}; model {body.get('model_version')}, "
              f"{body.get('corpus_size')} videos)")
        results = body["results"][0]["videos"]
        for rank, v in enumerate(results, 1):
            m = v["moment"]
            mark = "  <- true video" if v["video_id"] == a["true_video"] else ""
            print(f"  {rank}. {v['video_id']:<28} score {v['score']:.3f} (clip {v['clip_score']:.3f}, "
                  f"frame {v['frame_score']:.3f}) moment {m['start']}-{m['end']} {m['unit']}{mark}")
