"""`prvr demo`: the training pipeline end to end on built-in synthetic data.

Runs the Kubeflow pipeline (pipelines/prvr_pipeline.py) locally with kfp's SubprocessRunner
(or, with ``--no-pipeline``, the same stage functions directly), then prints the
data summary, the test metrics and the registry's promotion decision. The local runner's
own output (every task's streamed log and executor JSON) goes to a log file; the terminal
gets one line per pipeline step.

Usage::

    prvr demo                        # small preset, runs/kfp, registry file://registry
    prvr demo --preset tiny --epochs 2 --no-pipeline
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

import kfp.local

from prvr import stages
from prvr.collection import Collection, format_stats
from prvr.config import Config
from prvr.errors import PrvrError
from prvr.archive import build_archive
from prvr.client import Client, SearchResponse
from prvr.server import TorchServe
from prvr.ui import DEFAULT_HOST, DEFAULT_PORT
from prvr.registry import Registry
from prvr.reports import format_decision, format_table

__all__ = ["run_pipeline", "run_stages", "print_summary", "serve_and_query", "print_answers",
           "print_ui_hint", "StepLog", "pipeline_log", "DEMO_EPOCHS"]

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


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK_START = re.compile(r"Executing task '([^']+)'")
_TASK_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
_TASK_CACHED = re.compile(r"Task (\S+) cache hit")


class StepLog(io.TextIOBase):
    """Stands in for stdout and stderr while kfp.local runs a pipeline: everything goes to
    ``log``; each finished step (name, seconds, status) becomes one line on ``out`` and an
    entry of ``steps``. kfp's local runner logs through a handler it binds to sys.stdout and
    prints its tasks' output, so replacing sys.stdout catches all of it."""

    def __init__(self, log: TextIO, out: TextIO):
        super().__init__()
        self.log, self.out = log, out
        self.steps: list[tuple[str, float, str]] = []
        self._started: dict[str, float] = {}
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.log.flush()

    def _line(self, line: str) -> None:
        if m := _TASK_START.search(line):
            self._started[m[1]] = time.monotonic()
        elif (m := _TASK_END.search(line)) or (m := _TASK_CACHED.search(line)):
            name = m[1]
            status = m[2] if m.re is _TASK_END else "CACHED"
            seconds = time.monotonic() - self._started.pop(name, time.monotonic())
            self.steps.append((name, seconds, status))
            print(f"  {len(self.steps)}. {name:<24} {seconds:7.1f} s  {status}", file=self.out, flush=True)


@contextlib.contextmanager
def pipeline_log(path: str | Path, out: TextIO | None = None) -> Iterator[StepLog]:
    """Send this process's stdout and stderr to ``path`` (one progress line per step to ``out``,
    default the real stdout) for the duration of the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = out or sys.stdout
    with open(path, "w", encoding="utf-8") as log:
        steps = StepLog(log, out)
        with contextlib.redirect_stdout(steps), contextlib.redirect_stderr(steps):
            yield steps


def run_pipeline(cfg: Config, preset: str, epochs: int, pipeline_root: str | Path = "runs/kfp",
                 registry_uri: str = "file://registry", overrides: list[str] | None = None) -> dict[str, Any]:
    """One local run of the whole Kubeflow pipeline; returns {dataset, metrics, decision, ...}.

    Prints one line per step; the local runner's full output goes to ``<root>/demo-<time>.log``."""
    pipeline = _load_pipeline()
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.log"
    print(f"\n== Kubeflow pipeline, run locally (full log: {log_path}) ==", flush=True)
    t0 = time.monotonic()
    try:
        with pipeline_log(log_path) as steps:
            kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
            task = pipeline(source=f"synth:{preset}:{cfg.synth.seed}", variant=cfg.model.variant,
                            epochs=epochs, alpha=cfg.model.alpha, registry_uri=_file_uri(registry_uri),
                            endpoint_url=cfg.registry.endpoint_url or "",
                            promotion_margin=cfg.registry.promotion_margin,
                            params_overrides=list(overrides or []), base_params=stages.pipeline_params(cfg))
    except RuntimeError as exc:
        raise PrvrError(f"the pipeline failed: {_ANSI.sub('', str(exc))}; full log: {log_path}") from exc
    print(f"  {len(steps.steps)} steps in {time.monotonic() - t0:.0f} s", flush=True)
    out = task.outputs
    return {"dataset": _read(out["dataset"].path, stages.DATASET_JSON),
            "metrics": _read(out["evaluation"].path, "metrics.json"),
            "decision": _read(out["decision"].path, stages.DECISION_JSON),
            "report": str(Path(out["evaluation"].path) / "report.html"),
            "run_dir": str(Path(out["dataset"].path).parent.parent), "log": str(log_path)}


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
    if result.get("log"):
        print(f"pipeline log: {result['log']}")


def serve_and_query(cfg: Config, result: dict[str, Any], registry_uri: str,
                    workdir: str | Path = "runs/demo-serve", queries: int = 2) -> list[dict[str, Any]]:
    """Package the production model, start TorchServe on free loopback ports, ask typed queries.

    The queries are test captions of the demo collection, so the answer can be checked
    against the video they were written for. The server is stopped before returning."""
    reg = Registry(_file_uri(registry_uri), endpoint_url=cfg.registry.endpoint_url, settings=cfg.registry)
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
    with TorchServe(work, mar.parent, {"prvr": mar.name}, free_ports=True) as server, \
            Client(server.inference_url, key=server.keys()["inference"]) as api:
        for cap in captions:
            answer: SearchResponse = api.search(cap.text, top_k=3)
            answers.append({"query": cap.text, "true_video": cap.video_id, "answer": answer})
    return answers


def print_answers(answers: list[dict[str, Any]]) -> None:
    print("\n== served by TorchServe (REST, token auth) ==")
    for a in answers:
        answer: SearchResponse = a["answer"]
        print(f"query: {a['query']!r}  (written for {a['true_video']}; model {answer.model_version}, "
              f"{answer.corpus_size} videos, {answer.timing.round_trip_ms:.0f} ms)")
        for hit in answer.hits:
            m = hit.moment
            mark = "  <- true video" if hit.video_id == a["true_video"] else ""
            print(f"  {hit.rank}. {hit.video_id:<28} score {hit.score:.3f} (clip {hit.clip_score:.3f}, "
                  f"frame {hit.frame_score:.3f}) moment {m.start}-{m.end} {m.unit}{mark}")


def print_ui_hint(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Where to search the demo's model in a browser (`make ui` serves it, then the page)."""
    print(f"\nSearch the production model in a browser: run `make ui` (TorchServe + the page), "
          f"then open http://{host}:{port}/")
