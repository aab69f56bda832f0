"""Pipeline stages: one plain function per step, shared by Kubeflow, DVC and the CLI.

Each stage reads folders, writes its outputs into ``out_dir`` and returns a dict.
The Kubeflow components (``components/*.py``) and the ``prvr stage ...`` commands
that ``dvc.yaml`` runs are thin shells over these functions, so a step behaves the
same on a laptop, under ``dvc repro`` and in a cluster.

A *dataset folder* is what :func:`preprocess` writes: ``dataset.json`` (where the
collection and its text-feature HDF5 are, plus statistics), and for ``synth:``
sources the collection itself. Every stage that takes a dataset folder also accepts
a plain collection folder.

Usage::

    cfg = load_config()
    preprocess("synth:tiny", "runs/dataset", cfg)
    train_step("runs/dataset", "runs/train", cfg)
    ev = evaluate_step("runs/dataset", "runs/train", "runs/evaluate", cfg)
    register_step("runs/train", ev["metrics"], "runs/dataset", cfg, "file://registry", margin=0.0)
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from prvr.checkpoint import read_checkpoint, write_json_atomic
from prvr.collection import Collection
from prvr.config import Config, load_config
from prvr.errors import CheckpointError, DataError, PrvrError
from prvr.evaluate import evaluate
from prvr.indexing import build_index
from prvr.monitoring import LAST_SUCCESS, push_run_metrics
from prvr.archive import build_archive
from prvr.plots import plot_evaluation
from prvr.registry import Judge, Registry, compare_metric, resolve_metric
from prvr.registry.mirror import Mirror
from prvr.remote_data import check_version, fetch_remote, remote_kind, resolve_remote
from prvr.reports import SCORES, report_html, report_markdown
from prvr.synth import synthesize
from prvr.text import TextEncoder, encode_collection, encoder_identifier
from prvr.train import train

__all__ = [
    "DATASET_JSON", "preprocess", "train_step", "evaluate_step", "register_step", "load_dataset",
    "parse_source", "resolve_source", "stage_config", "pipeline_params", "kfp_metrics", "dataset_metadata",
    "train_metadata",
    "checkpoint_sync",
]

DATASET_JSON = "dataset.json"
RESUME_JSON = "resume.json"          # fingerprint of the config + data a run folder was trained on
DECISION_JSON = "decision.json"
_FINGERPRINT_SAMPLE = 1 << 20        # bytes of feature.bin hashed at its start, middle and end


# ----------------------------------------------------------------------------- helpers
def stage_config(base: Mapping[str, Any] | None = None, overrides: list[str] | None = None,
                 params: str | Path | None = None) -> Config:
    """The config a stage runs with: ``base`` (a ``cfg.to_dict()`` snapshot, as the compiled
    pipeline carries) or the params file, then ``section.key=value`` overrides in order."""
    if base:
        return Config.from_dict(copy.deepcopy(dict(base))).override(list(overrides or []))
    return load_config(params, list(overrides or []))


def pipeline_params(cfg: Config) -> dict[str, Any]:
    """``cfg.to_dict()`` without null settings (KFP parameters cannot hold null); the typed
    config's defaults (None for every optional field) fill them back in :func:`stage_config`."""
    return {section: {k: v for k, v in values.items() if v is not None}
            for section, values in cfg.to_dict().items()}


def _push(job: str, values: Mapping[str, Any], cfg: Config) -> bool:
    """Run metrics to the Pushgateway named by $PRVR_PUSHGATEWAY (a no-op without it), with
    prvr_run_last_success_timestamp_seconds: called only when a stage succeeded, and a failed
    run pushes nothing, so the alert on a stale pipeline (deploy/prometheus/alerts.yaml) sees
    the last success."""
    return push_run_metrics(job, {**values, LAST_SUCCESS: time.time()},
                            labels={"collection": cfg.data.collection, "variant": cfg.model.variant})


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (read-only mounts and permissions both count)."""
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        return False
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".prvr-write-test-"):
            return True
    except OSError:
        return False


def parse_source(source: str, cfg: Config) -> tuple[str, str | None, int | None, Path | None]:
    """``synth:<preset>[:<seed>]`` -> ("synth", preset, seed, None); ``dvc://...`` / ``s3://...``
    (:mod:`prvr.remote_data`) -> ("dvc" | "s3", None, None, None); anything else is a
    collection folder -> ("path", None, None, path)."""
    kind = remote_kind(source)
    if kind:
        return kind, None, None, None
    if source.startswith("synth:"):
        parts = source.split(":")
        if len(parts) not in (2, 3) or not parts[1]:
            raise DataError(f"source {source!r}: expected synth:<preset> or synth:<preset>:<seed>")
        try:
            seed = int(parts[2]) if len(parts) == 3 else cfg.synth.seed
        except ValueError:
            raise DataError(f"source {source!r}: the seed must be an integer") from None
        return "synth", parts[1], seed, None
    return "path", None, None, Path(source).expanduser()


def _fingerprint(collection: Any) -> str:
    """md5 over a collection's captions, moments, feature layout and sampled feature bytes:
    portable (no paths, no mtimes), cheap even for a TVR-sized feature.bin."""
    h = hashlib.md5(usedforsecurity=False)
    files = [collection.caption_path(s) for s in collection.available_splits()]
    folder = collection.feature_folder
    files += [collection.moments_path, folder / "id.txt", folder / "shape.txt", folder / "video2frames.txt"]
    for f in files:
        h.update(f.name.encode())
        if f.is_file():
            h.update(f.read_bytes())
    binary = folder / "feature.bin"
    size = binary.stat().st_size
    h.update(str(size).encode())
    with open(binary, "rb") as fh:
        for offset in (0, max(0, size // 2 - _FINGERPRINT_SAMPLE // 2), max(0, size - _FINGERPRINT_SAMPLE)):
            fh.seek(offset)
            h.update(fh.read(_FINGERPRINT_SAMPLE))
    if collection.has_text_features:
        h.update(f"{collection.text_encoder}:{collection.text_feature_path.stat().st_size}".encode())
    return h.hexdigest()


def resolve_source(source: str, cfg: Config) -> dict[str, str]:
    """{source, kind, data_version} of ``source`` as :func:`preprocess` records it, without
    fetching remote features (the Kubeflow cache key of preprocess): ``dvc:<commit>:<md5>`` or
    ``s3:<sha256>`` for remote sources (:mod:`prvr.remote_data`); ``md5:<fingerprint>`` of the
    collection as given for a folder, or for ``synth:`` (generated into a temp folder)."""
    kind, preset, seed, path = parse_source(source, cfg)
    if kind not in ("synth", "path"):
        return resolve_remote(source)
    with tempfile.TemporaryDirectory(prefix="prvr-resolve-") as tmp:
        if kind == "synth":
            path = synthesize(tmp, cfg.data.collection, preset, seed)
        assert path is not None
        coll = Collection(path, cfg.data.video_feature, cfg.data.text_feature_file)
        return {"source": source, "kind": kind, "data_version": f"md5:{_fingerprint(coll)}"}


def _source_folder(source: str, out_dir: Path, cfg: Config, expected: str | None) -> tuple[Path, str | None]:
    """The collection folder of ``source`` (synthesized or downloaded into ``out_dir``) and,
    for a remote source, its data version."""
    kind, preset, seed, path = parse_source(source, cfg)
    if kind == "synth":
        return synthesize(out_dir, cfg.data.collection, preset, seed), None
    if kind == "path":
        assert path is not None
        return path, None
    return fetch_remote(source, out_dir, expected)


# ----------------------------------------------------------------------------- preprocess
def _text_features(coll: Collection, out_dir: Path, cfg: Config, encoder: Any,
                   readonly_source: bool) -> tuple[Collection, bool]:
    """The collection over the query features ``text.source`` asks for, and whether they were
    encoded now. ``auto``: the HDF5 when present, else encode (next to the captions, or into
    ``out_dir`` when the source may not be written); ``hdf5``: the HDF5, a DataError without
    one; ``encoder``: ``text.encoder``'s features, encoded into ``out_dir`` unless the HDF5
    present is that encoder's own (the source's file is never replaced)."""
    source = cfg.text.source
    target = coll.text_feature_path
    if coll.has_text_features:
        if source != "encoder":
            return coll, False
        name = encoder.name if encoder is not None else encoder_identifier(cfg.text.encoder, cfg.text.precision,
                                                                           cfg.text.quantize)
        if coll.text_encoder == name:
            return coll, False
        target = out_dir / target.name
    elif source == "hdf5":
        raise DataError(f"text.source is hdf5 but the text feature file {target} is missing: set "
                        "text.source to auto or encoder to encode the captions with text.encoder")
    elif readonly_source or not _writable(target.parent):
        target = out_dir / target.name
    if encoder is None:
        encoder = TextEncoder.from_config(cfg)
    encode_collection(coll.path, encoder, target, batch_size=cfg.text.batch_size)
    # Collection joins TextData / file; an absolute file name replaces the folder.
    return Collection(coll.path, cfg.data.video_feature, str(target.resolve())), True


def preprocess(source: str, out_dir: str | Path, cfg: Config, encoder: Any = None,
               readonly_source: bool = False, expected_version: str | None = None) -> dict[str, Any]:
    """Make a dataset folder from ``source``: a collection folder in the public layout,
    ``synth:<preset>[:<seed>]`` to generate one into ``out_dir/<data.collection>``, or a
    versioned ``dvc://<repo-url>@<rev>#<path>`` / ``s3://<bucket>/<prefix>/<collection>`` to
    download into ``out_dir/<collection>``. ``data_version`` in the record names the data (see
    :func:`resolve_source`); ``expected_version``, a version resolved earlier, must match it.

    Validates it with ``Collection.check()`` and encodes the query text features when
    the HDF5 is absent: next to the captions, or into ``out_dir`` when the source may
    not be written (``readonly_source`` or a read-only folder); with ``text.source:
    encoder`` also over an HDF5 of another encoder, into ``out_dir``. Writes and returns
    the ``dataset.json`` record {path, collection, stats, text_feature_file, ...}.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    path, version = _source_folder(source, out_dir, cfg, expected_version)
    out_dir.mkdir(parents=True, exist_ok=True)
    coll = Collection(path, cfg.data.video_feature, cfg.data.text_feature_file)
    data_version = version or f"md5:{_fingerprint(coll)}"     # the data as given, before encoding
    check_version(source, data_version, expected_version)
    coll, encoded = _text_features(coll, out_dir, cfg, encoder, readonly_source)
    stats = coll.check()
    text_file = coll.text_feature_path.resolve()
    base = out_dir.resolve()
    record = {
        "source": source,
        "data_version": data_version,
        "collection": coll.name,
        # Paths relative to the dataset folder (portable when the folder moves with its
        # data, as DVC checkouts and KFP artifacts do) and absolute (external mounts).
        "path": os.path.relpath(coll.path.resolve(), base),
        "text_feature_file": os.path.relpath(text_file, base),
        "abs_path": str(coll.path.resolve()),
        "abs_text_feature_file": str(text_file),
        "video_feature": stats["video_feature"],
        "text_encoder": stats["text_encoder"],
        "encoded_text": encoded,
        "fingerprint": _fingerprint(coll),
        "stats": stats,
    }
    write_json_atomic(out_dir / DATASET_JSON, record)
    splits = stats["splits"]
    _push("prvr-preprocess", {"duration_seconds": time.time() - t0,
                              "videos": sum(s["videos"] for s in splits.values()),
                              "queries": sum(s["queries"] for s in splits.values())}, cfg)
    return record


def dataset_metadata(record: Mapping[str, Any]) -> dict[str, Any]:
    """Flat, JSON-safe summary of a dataset.json record (KFP artifact metadata)."""
    stats = record["stats"]
    meta: dict[str, Any] = {k: record.get(k) for k in ("source", "data_version", "collection", "video_feature",
                                                      "text_encoder", "fingerprint")}
    meta.update(video_dim=stats["video_dim"], text_dim=stats["text_dim"])
    for split, s in stats["splits"].items():
        meta[f"{split}_videos"], meta[f"{split}_queries"] = s["videos"], s["queries"]
    return meta


def _locate(dataset_dir: Path, record: Mapping[str, Any], key: str) -> Path:
    rel = dataset_dir / record[key]
    if rel.exists():
        return rel.resolve()
    absolute = Path(record.get(f"abs_{key}") or "")
    if absolute.exists():
        return absolute
    raise DataError(f"{dataset_dir / DATASET_JSON}: {key} {record[key]!r} not found relative to "
                    f"{dataset_dir} nor at {absolute}")


def load_dataset(dataset_dir: str | Path, cfg: Config) -> tuple[Path, Config, dict[str, Any] | None]:
    """(collection folder, cfg pointing at its features, dataset.json record or None).

    ``dataset_dir`` is a folder written by :func:`preprocess`, or a plain collection
    folder (then cfg is returned as is). ``cfg`` itself is never modified.
    """
    d = Path(dataset_dir)
    cfg = copy.deepcopy(cfg)
    record_file = d / DATASET_JSON
    if not record_file.is_file():
        if not d.is_dir():
            raise DataError(f"dataset folder not found: {d}")
        return d, cfg, None
    try:
        record = json.loads(record_file.read_text())
    except ValueError as exc:
        raise DataError(f"{record_file} is not valid JSON ({exc})") from None
    path = _locate(d, record, "path")
    cfg.data.video_feature = record.get("video_feature") or cfg.data.video_feature
    cfg.data.text_feature_file = str(_locate(d, record, "text_feature_file"))
    return path, cfg, record


# ----------------------------------------------------------------------------- train
def _run_fingerprint(cfg: Config, data_path: Path, record: Mapping[str, Any] | None) -> str:
    """What a run folder's last.pt depends on: every training-relevant setting and the data."""
    d = cfg.to_dict()
    relevant = {k: d[k] for k in ("model", "train", "text")}
    relevant["train"].pop("checkpoint_uri", None)      # where the run is mirrored, not what it is
    relevant["data"] = record["fingerprint"] if record else _plain_data_id(data_path)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _plain_data_id(path: Path) -> str:
    return _fingerprint(Collection(path))


def _clean_run(out_dir: Path) -> None:
    for name in ("last.pt", "model.pt", "train_summary.json", RESUME_JSON):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / "dvclive", ignore_errors=True)


def _prepare_run_dir(out_dir: Path, fingerprint: str, resume: bool) -> None:
    """Resume only a run of the same config and data whose best checkpoint still exists;
    otherwise start clean (a stale last.pt would silently continue another experiment)."""
    marker = out_dir / RESUME_JSON
    if (out_dir / "last.pt").exists():
        same = marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint
        if not resume or not same or not (out_dir / "model.pt").exists():
            if resume:
                print(f"{out_dir}: previous run used other settings or data; starting over",
                      file=sys.stderr)
            _clean_run(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"fingerprint": fingerprint})


_RESUME_FILES = (RESUME_JSON, "model.pt", "last.pt")   # pulled in this order: last.pt (the marker) last


def _mirror(cfg: Config) -> Mirror | None:
    uri = cfg.train.checkpoint_uri
    return Mirror(uri, cfg.registry.endpoint_url, cfg.registry) if uri else None


def _prepare_mirrored_run_dir(out_dir: Path, fingerprint: str, resume: bool, cfg: Config) -> None:
    """:func:`_prepare_run_dir`, with ``train.checkpoint_uri``: a run folder without last.pt
    first takes the mirrored resume files; then the mirror holds this run's resume.json and
    no last.pt of another run (so a pod that dies before epoch 1 never resumes a stranger)."""
    mirror = _mirror(cfg)
    if mirror and resume and not (out_dir / "last.pt").exists() and mirror.pull(out_dir, _RESUME_FILES):
        print(f"{out_dir}: resume files copied from {mirror.uri}", file=sys.stderr)
    _prepare_run_dir(out_dir, fingerprint, resume)
    if mirror:
        if not (out_dir / "last.pt").exists():
            mirror.delete(("last.pt", "model.pt"))
        mirror.push(out_dir, (RESUME_JSON,))


def checkpoint_sync(cfg: Config, out_dir: str | Path) -> Callable[[int, bool], None] | None:
    """The ``on_epoch`` hook of :func:`prvr.train.train` that mirrors the run's model.pt (when
    the epoch is the best so far) and last.pt to ``train.checkpoint_uri``; None when unset.
    A failed upload is reported and training goes on (the next epoch uploads again)."""
    mirror, folder, pending = _mirror(cfg), Path(out_dir), set()
    if mirror is None:
        return None

    def sync(epoch: int, improved: bool) -> None:
        if improved:
            pending.add("model.pt")
        try:
            mirror.push(folder, [*sorted(pending), "last.pt"])
            pending.clear()
        except PrvrError as exc:
            print(f"epoch {epoch}: checkpoint not mirrored, training goes on: {exc}", file=sys.stderr)
    return sync


def train_step(dataset_dir: str | Path, out_dir: str | Path, cfg: Config, nproc: int = 1,
               resume: bool = True, keep_last: bool = True, progress: bool = False) -> dict[str, Any]:
    """Train into ``out_dir`` (model.pt = best epoch, dvclive/, train_summary.json, params.yaml).

    ``nproc > 1`` runs ``torchrun --standalone --nproc-per-node N -m prvr.cli train-worker`` (one
    process per GPU; gloo on CPU). ``keep_last=False`` drops the resume state (last.pt)
    at the end, e.g. for a model artifact. With ``train.checkpoint_uri`` the resume state is
    also mirrored there after every epoch, and an empty ``out_dir`` resumes from it.
    """
    if nproc < 1:
        raise PrvrError(f"nproc must be >= 1, got {nproc}")
    t0 = time.time()
    data_path, cfg, record = load_dataset(dataset_dir, cfg)
    out_dir = Path(out_dir)
    _prepare_mirrored_run_dir(out_dir, _run_fingerprint(cfg, data_path, record), resume, cfg)
    params_file = out_dir / "params.yaml"
    params_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "prvr.cli", "train-worker", "--data", str(data_path), "--out", str(out_dir),
               "--params", str(params_file)]
        if not progress:
            cmd.append("--no-progress")
        print("+ torchrun " + " ".join(cmd[3:]), file=sys.stderr)
        rc = subprocess.run(cmd, check=False).returncode
        if rc != 0:
            raise PrvrError(f"distributed training ({nproc} processes) failed with exit status {rc}; "
                            "see the log above")
        result = json.loads((out_dir / "train_summary.json").read_text())
    else:
        result = train(cfg, data_path, out_dir, resume=resume, progress=progress,
                       on_epoch=checkpoint_sync(cfg, out_dir))
    if not (out_dir / "model.pt").is_file():
        raise PrvrError(f"training finished without a checkpoint at {out_dir / 'model.pt'}")
    if not keep_last:
        (out_dir / "last.pt").unlink(missing_ok=True)
    result.update(model_dir=str(out_dir), checkpoint=str(out_dir / "model.pt"), nproc=nproc,
                  duration_seconds=round(time.time() - t0, 3), variant=cfg.model.variant)
    _push("prvr-train", {k: result[k] for k in ("duration_seconds", "epochs", "best_sumr", "best_epoch",
                                                 "collapse_restarts", "stopped_early")}, cfg)
    return result


def train_metadata(result: Mapping[str, Any]) -> dict[str, Any]:
    """Scalar summary of a train_step result (KFP Model metadata and Metrics)."""
    return {k: result[k] for k in ("best_sumr", "best_epoch", "epochs", "stopped_early", "collapse_restarts",
                                   "duration_seconds", "nproc", "variant") if k in result}


# ----------------------------------------------------------------------------- evaluate
def _checkpoint_of(model_dir: str | Path) -> Path:
    p = Path(model_dir)
    return p / "model.pt" if p.is_dir() else p


def evaluate_step(dataset_dir: str | Path, model_dir: str | Path, out_dir: str | Path, cfg: Config,
                  metrics_file: str | Path | None = None, split: str | None = None) -> dict[str, Any]:
    """Evaluate ``model_dir/model.pt`` on a split; writes metrics.json (or ``metrics_file``),
    plots/*.png, report.html (charts inlined) and report.md into ``out_dir``."""
    t0 = time.time()
    data_path, cfg, _ = load_dataset(dataset_dir, cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = Path(metrics_file) if metrics_file else out_dir / "metrics.json"
    metrics = evaluate(cfg, data_path, _checkpoint_of(model_dir), split, out=metrics_file)
    plots = plot_evaluation(metrics, out_dir / "plots")
    html_file = out_dir / "report.html"
    html_file.write_text(report_html(metrics, plots))
    md_file = out_dir / "report.md"
    md_file.write_text(report_markdown(metrics))
    duration = round(time.time() - t0, 3)
    _push("prvr-evaluate", {"duration_seconds": duration, **kfp_metrics(metrics)}, cfg)
    return {"metrics": metrics, "metrics_file": str(metrics_file), "plots": [str(p) for p in plots],
            "html": str(html_file), "markdown": str(md_file), "duration_seconds": duration}


def kfp_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flat scalar metrics ("fused_r1", ..., "frame_sumr") for Metrics.log_metric and Prometheus."""
    out = {f"{s}_{k}": float(metrics[s][k]) for s in SCORES if s in metrics
           for k in ("r1", "r5", "r10", "r100", "sumr", "medr", "mnr")}
    for k in ("num_queries", "num_videos"):
        if k in metrics:
            out[k] = float(metrics[k])
    return out


# ----------------------------------------------------------------------------- register
def _data_version(dataset_dir: Path, record: Mapping[str, Any] | None) -> str | None:
    """What identifies the data: dataset.json's data_version (dvc:<commit>:<md5>, s3:<etags hash>
    or md5:<fingerprint>), else its fingerprint, else the md5 of ./dvc.lock."""
    if record and record.get("data_version"):
        return str(record["data_version"])
    if record and record.get("fingerprint"):
        return f"md5:{record['fingerprint']}"
    lock = Path("dvc.lock")
    if lock.is_file():
        return f"dvc.lock-md5:{hashlib.md5(lock.read_bytes(), usedforsecurity=False).hexdigest()}"
    return None


def _build_index(checkpoint: Path, data_path: Path, cfg: Config, out_dir: Path,
                 data_version: str | None = None) -> tuple[Path, str]:
    """The video index for serving, of the videos `serve.corpus` names (default all of
    FeatureData, else a split or a file of video ids), recording `data_version`; with
    `search.backend: faiss` its faiss index too (`search.index_type`, `search.refine_codes`),
    else every serving worker would train one when it loads."""
    shutil.rmtree(out_dir, ignore_errors=True)
    ann = cfg.search.index_type if cfg.search.backend == "faiss" else None
    path = build_index(checkpoint, data_path, cfg.serve.corpus, out_dir, cfg, ann_type=ann,
                       data_version=data_version)
    size = json.loads((Path(path) / "manifest.json").read_text())["corpus_size"]
    inside = f" with a faiss {ann} index" if ann else ""
    return Path(path), (f"index of {size} videos (serve.corpus {cfg.serve.corpus}){inside}, "
                        f"for the {cfg.search.backend} backend")


def _trained_config(checkpoint: Path) -> dict[str, Any]:
    """The settings the model was trained with (the checkpoint's config)."""
    try:
        return read_checkpoint(checkpoint)["config"]
    except CheckpointError as exc:
        raise PrvrError(str(exc)) from None


def _evaluate_production(registry: Registry, name: str, version: str, data_path: Path, cfg: Config,
                         split: str) -> dict[str, Any]:
    """Metrics of production ``version`` on ``split`` of this data (only its model.pt is pulled).
    CheckpointError when it cannot be evaluated here (no model.pt, other dims or text encoder)."""
    if "model.pt" not in registry.show(name, version)["files"]:
        raise CheckpointError("the version has no model.pt")
    with tempfile.TemporaryDirectory(prefix="prvr-production-") as tmp:
        folder = registry.pull(name, version, tmp, files=["model.pt"])
        return evaluate(cfg, data_path, folder / "model.pt", split)


def _production_judge(registry: Registry, name: str, data_path: Path, cfg: Config,
                      metrics: Mapping[str, Any], margin: float) -> Judge:
    """The gate's judge: production evaluated on the candidate's own split (the same videos,
    queries and features), so the two SumRs are like for like; a production that cannot be
    evaluated on this data, or candidate metrics not measured on it, block promotion."""
    split = str(metrics.get("split") or cfg.eval.split)
    candidate = resolve_metric(metrics, "sumr")
    where = f" on the {split} split of this data"

    def judge(version: str | None) -> dict[str, Any]:
        if version is None:
            return {**compare_metric("sumr", candidate or 0.0, None, None, margin), "split": split}
        refuse = {"better": False, "comparable": False, "production": None, "split": split}
        try:
            prod = _evaluate_production(registry, name, version, data_path, cfg, split)
        except CheckpointError as exc:
            return {**refuse, "reason": f"production {version} cannot be evaluated on this data: {exc}"}
        for key in ("num_queries", "num_videos"):
            if key in metrics and metrics[key] != prod[key]:
                return {**refuse, "reason": f"the candidate's metrics were not measured on this data: {key} "
                                            f"{metrics[key]}, the {split} split has {prod[key]}"}
        verdict = compare_metric("sumr", candidate or 0.0, version, resolve_metric(prod, "sumr"), margin, where)
        return {**verdict, "split": split}
    return judge


def register_step(model_dir: str | Path, metrics: Mapping[str, Any] | str | Path, dataset_dir: str | Path,
                  cfg: Config, registry_uri: str | None = None, margin: float | None = None,
                  endpoint_url: str | None = None, out_dir: str | Path | None = None,
                  build_index: bool = True, promote: bool = True) -> dict[str, Any]:
    """The promotion gate: build the video index, evaluate the production model on the
    candidate's own test split, then register the model, index and metrics (every candidate,
    promoted or not, with the decision, data version and source in its manifest) and promote
    it only if ``promote`` is set and its test SumR beats production's ON THAT SPLIT by more
    than ``margin``. A production that cannot be evaluated on this data (other video or text
    dims, other text encoder, no model.pt) is never replaced here. ``promote=False`` (dvc.yaml)
    never moves production: ``prvr registry promote --version vNNNN`` does. A promoted
    version is also packaged as ``model_store/prvr-<version>.mar`` for TorchServe. The
    version's params are the settings stored in the checkpoint (what it was trained with).

    ``metrics`` is the evaluate dict or its JSON file. Writes ``decision.json`` into
    ``out_dir`` (default: ``<model_dir>/../register``) and returns the decision
    (promoted, outcome, version, reason, candidate, production, production_version, ...).
    """
    t0 = time.time()
    data_path, cfg, record = load_dataset(dataset_dir, cfg)
    checkpoint = _checkpoint_of(model_dir)
    if not checkpoint.is_file():
        raise PrvrError(f"checkpoint not found: {checkpoint}")
    out_dir = Path(out_dir) if out_dir else checkpoint.parent.parent / "register"
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(metrics, (str, Path)):
        metrics_file = Path(metrics)
        try:
            metrics = json.loads(metrics_file.read_text())
        except (OSError, ValueError) as exc:
            raise PrvrError(f"cannot read the metrics JSON {metrics_file}: {exc}") from None
    else:
        metrics_file = write_json_atomic(out_dir / "metrics.json", dict(metrics))
    files: dict[str, Path] = {"model.pt": checkpoint, "metrics.json": metrics_file}
    data_version = _data_version(Path(dataset_dir), record)
    index_dir, index_note = (None, "index skipped: disabled")
    if build_index:
        index_dir, index_note = _build_index(checkpoint, data_path, cfg, out_dir / "index", data_version)
    if index_dir is not None:
        files["index"] = index_dir
    uri = registry_uri or cfg.registry.uri
    margin = cfg.registry.promotion_margin if margin is None else float(margin)
    registry = Registry(uri, endpoint_url=endpoint_url or cfg.registry.endpoint_url, settings=cfg.registry)
    judge = _production_judge(registry, cfg.registry.model_name, data_path, cfg, metrics, margin)
    decision = registry.register_if_better(cfg.registry.model_name, files, metrics,
                                           params=_trained_config(checkpoint), margin=margin,
                                           data_version=data_version, judge=judge, promote=promote,
                                           source=record.get("source") if record else str(data_path))
    decision.update(model_name=cfg.registry.model_name, registry_uri=uri, margin=margin,
                    data_version=data_version, index=index_dir is not None, index_note=index_note)
    if decision.get("promoted") and index_dir is not None:
        # The TorchServe archive of the new production version, ready for `prvr serve`.
        decision["archive"] = str(build_archive(checkpoint, index_dir, out_dir / "model_store",
                                                decision["version"], "prvr", cfg))
    decision["duration_seconds"] = round(time.time() - t0, 3)
    write_json_atomic(out_dir / DECISION_JSON, decision)
    _push("prvr-register", {"duration_seconds": decision["duration_seconds"],
                            "promoted": decision["promoted"], "candidate_sumr": decision["candidate"]}, cfg)
    return decision
