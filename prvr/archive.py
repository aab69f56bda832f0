"""TorchServe archives: a checkpoint, its video index and the serving settings in one file.

``build_archive`` writes ``<model_name>-<version>.mar`` (torch-model-archiver):

    model.pt              the checkpoint (serialized file)
    handler.py            serving/handler.py (thin; logic in prvr.serving)
    index/                the video index (prvr.indexing.build_index output)
    serve.json            model version, text encoder, serve + search settings
    model-config.yaml     TorchServe batch size / delay / workers / timeout

Usage::

    mar = build_archive("runs/train/model.pt", "runs/index", "model_store", "v0003", "prvr", cfg)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from prvr.checkpoint import read_checkpoint
from prvr.config import Config
from prvr.errors import PrvrError, SearchIndexError
from prvr.search import VideoIndex
from prvr.search.ann import build_faiss_into, stored_ann_fits
from prvr.serving import check_index

__all__ = ["build_archive", "model_config", "run_archiver", "HANDLER", "DEFAULT_CONFIG", "LOG_CONFIG", "SERVING"]

_SOURCE_SERVING = Path(__file__).resolve().parent.parent / "serving"
# A source checkout has serving/ next to prvr/; the container image keeps it in /app/serving.
SERVING = _SOURCE_SERVING if _SOURCE_SERVING.is_dir() else Path.cwd() / "serving"
HANDLER = SERVING / "handler.py"
DEFAULT_CONFIG = SERVING / "config.properties"
LOG_CONFIG = SERVING / "log4j2.xml"         # TorchServe's logging: one line per request


def _check_inputs(checkpoint: Path, index_dir: Path, version: str) -> tuple[dict, dict]:
    ckpt = read_checkpoint(checkpoint)
    if not index_dir.is_dir():
        raise SearchIndexError(f"video index folder not found: {index_dir} (build it with prvr.search)")

    manifest = dict(VideoIndex.load(index_dir).manifest or {})
    check_index(manifest, index_dir, checkpoint, ckpt, version)
    return ckpt, manifest


def _with_faiss_index(index_dir: Path, cfg: Config, manifest: dict) -> None:
    """Build the faiss index `cfg.search` asks for into the archive's copy of the video index
    when it lacks it, so workers load it instead of training one at start-up."""

    stored = manifest.get("ann")
    if not (stored_ann_fits(stored, cfg.search) and stored.get("refine_codes", "arrays") == cfg.search.refine_codes):
        build_faiss_into(index_dir, cfg.search)


def model_config(cfg: Config) -> str:
    """TorchServe's per-model settings. ``clientTimeoutInMills`` (serve.client_timeout_ms) bounds
    how long a request may wait in the job queue, e.g. while a killed worker reloads the model."""
    text = (f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {cfg.serve.batch_size}\n"
            f"maxBatchDelay: {cfg.serve.max_batch_delay_ms}\nresponseTimeout: 60\n")
    if cfg.serve.client_timeout_ms:
        text += f"clientTimeoutInMills: {cfg.serve.client_timeout_ms}\n"
    return text


def run_archiver(model_name: str, version: str, handler: Path, extra_files: Path, config_file: Path,
                 export: Path, serialized: Path | None = None) -> Path:
    """torch-model-archiver into the folder `export`: the .mar it wrote, or a PrvrError with its
    output. It stages files in $TMPDIR/<model_name>: export's parent as a private TMPDIR keeps
    concurrent builds apart."""
    cmd = [str(Path(sys.executable).parent / "torch-model-archiver"), "--model-name", model_name,
           "--version", version, "--handler", str(handler), "--extra-files", str(extra_files),
           "--config-file", str(config_file), "--export-path", str(export), "--archive-format", "default",
           "--force"] + (["--serialized-file", str(serialized)] if serialized is not None else [])
    if not Path(cmd[0]).exists():
        cmd[0] = shutil.which("torch-model-archiver") or cmd[0]
    proc = subprocess.run(cmd, env=dict(os.environ, TMPDIR=str(export.parent)), capture_output=True, text=True)
    built = export / f"{model_name}.mar"
    if proc.returncode != 0 or not built.is_file():
        raise PrvrError(f"torch-model-archiver failed ({proc.returncode}): "
                        f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return built


def build_archive(checkpoint: str | Path, index_dir: str | Path, out_dir: str | Path, version: str,
                  model_name: str, cfg: Config) -> Path:
    """Write ``out_dir/<model_name>-<version>.mar``; returns its path (replaced atomically).
    `cfg` gives the serve and search settings the archive carries."""
    checkpoint, index_dir, out_dir = Path(checkpoint), Path(index_dir), Path(out_dir)
    ckpt, index_manifest = _check_inputs(checkpoint, index_dir, version)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{model_name}-{version}.mar"
    with tempfile.TemporaryDirectory(prefix="prvr-package-") as tmp:
        tmp = Path(tmp)
        bundle = tmp / "bundle"
        shutil.copytree(index_dir, bundle / "index")
        if cfg.search.backend == "faiss":
            _with_faiss_index(bundle / "index", cfg, index_manifest)
        serve = {
            "format": 1, "model_name": model_name, "model_version": version,
            "checkpoint": "model.pt", "index": "index",
            "text_encoder": ckpt.get("text_encoder") or index_manifest.get("text_encoder"),
            "registry_model": cfg.registry.model_name,
            "serve": cfg.to_dict()["serve"], "search": cfg.to_dict()["search"],
        }
        (bundle / "serve.json").write_text(json.dumps(serve, indent=2) + "\n")
        (tmp / "model-config.yaml").write_text(model_config(cfg))
        (tmp / "weights").mkdir()
        weights = tmp / "weights" / "model.pt"
        shutil.copyfile(checkpoint, weights)
        export = tmp / "export"
        export.mkdir()
        built = run_archiver(model_name, version, HANDLER, bundle, tmp / "model-config.yaml", export, weights)
        staged = out_dir / f".{final.name}.tmp-{os.getpid()}"
        shutil.move(str(built), staged)
        os.replace(staged, final)
    return final
