"""The online retriever: checkpoint + text encoder + video index, answering batches.

``Retriever`` holds the checkpoint (``load_model``), the text encoder the model was
trained with (none for a model trained on precomputed HDF5 text features: it answers
token features, and typed text with a 422 saying how to retrain for it) and the
precomputed video index (``prvr.search``). ``answer(requests)``
turns a batch of raw requests into one response per request: valid ones are encoded
and scored together, a bad one gets its own 4xx and never fails the rest.

Response::

    {"model_version": "v0003", "corpus_size": 2179, "data_version": "md5:...", "top_k": 10, "alpha": 0.7,
     "results": [{"query": "...", "videos": [{"video_id", "score", "clip_score",
                  "frame_score", "moment": {"start", "end", "unit", "video_length"},
                  "title"?, "duration_s"?, "url"? (from the corpus's videos.jsonl)}, ...]}]}

Nothing here knows about a server: TorchServe (``prvr.serving.torchserve``) and KServe
(``prvr.kserve_app``) are thin adapters over this module and ``prvr.serving.request``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from prvr.checkpoint import sha256_file
from prvr.config import Config, SearchConfig, ServeConfig
from prvr.encoding import (check_text_encoder, encode_token_features, is_precomputed, load_model,
                           precomputed_message)
from prvr.errors import CheckpointError, RequestError, SearchIndexError
from prvr.registry import Registry
from prvr.search import VideoIndex, make_engine
from prvr.serving.request import Answer, Query, Request, error_answer, parse_request
from prvr.text import TextEncoder

__all__ = ["Retriever", "check_index", "load_serve_manifest", "torch_threads", "SERVE_MANIFEST", "INDEX_DIR",
           "CHECKPOINT"]

logger = logging.getLogger(__name__)

SERVE_MANIFEST = "serve.json"       # written by prvr.archive into the archive
INDEX_DIR = "index"
CHECKPOINT = "model.pt"


def check_index(manifest: dict[str, Any], index_dir: str | Path, checkpoint: str | Path, ckpt: dict,
                version: str | None) -> None:
    """Refuse an index built by another checkpoint (sha256), model version or text encoder."""
    built_sha = manifest.get("checkpoint_sha256")
    if built_sha:
        if built_sha != sha256_file(checkpoint):
            raise SearchIndexError(f"video index {index_dir} was built from another checkpoint than "
                                   f"{checkpoint} (sha256 {built_sha[:12]}...): rebuild it")
    elif version and manifest.get("model_version") not in (None, version):
        raise SearchIndexError(f"video index {index_dir} was built by model version "
                               f"{manifest.get('model_version')!r}, not {version!r}: rebuild it")
    trained_with, indexed_with = ckpt.get("text_encoder"), manifest.get("text_encoder")
    if trained_with and indexed_with and trained_with != indexed_with:
        raise CheckpointError(f"video index {index_dir} records text encoder {indexed_with!r}, the "
                              f"checkpoint {checkpoint} was trained with {trained_with!r}")


def load_serve_manifest(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / SERVE_MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: build the archive with `prvr package`")
    return json.loads(path.read_text())


def torch_threads(serve: dict[str, Any] | ServeConfig) -> int:
    """Intra-op threads of a serving process, set before anything runs: serve.threads, or the
    environment variable PRVR_TORCH_THREADS. docs/serving.md has the measured trade-off."""
    configured = serve.get("threads") if isinstance(serve, dict) else serve.threads
    threads = max(1, int(os.environ.get("PRVR_TORCH_THREADS") or configured or 1))
    torch.set_num_threads(threads)
    return threads


def _manifest_value(manifest: dict[str, Any], key: str, model_dir: Path) -> Any:
    """A serve.json entry that prvr.archive always writes; its absence is a broken archive."""
    if manifest.get(key) is None:
        raise CheckpointError(f"{model_dir / SERVE_MANIFEST} has no {key!r}: rebuild the archive "
                              f"with `prvr package`")
    return manifest[key]


class Retriever:
    """Checkpoint + text encoder + video index; answers batches of requests."""

    def __init__(self, model, cfg: Config, engine, index, encoder, serve_cfg: ServeConfig,
                 model_version: str, text_encoder: str | None, fps: float | None):
        self.model, self.cfg, self.engine, self.index = model, cfg, engine, index
        self.encoder, self.serve_cfg = encoder, serve_cfg
        self.model_version, self.text_encoder, self.fps = model_version, text_encoder, fps
        self.video_ids = [str(v) for v in index.video_ids]
        self.spans = np.asarray(index.spans)
        self.corpus_size = len(self.video_ids)
        self.text_dim = cfg.model.text_dim
        self.default_alpha = cfg.model.alpha
        self.data_version = (index.manifest or {}).get("data_version")
        # why typed text is refused when there is no encoder (None: the generic reason)
        self.refusal = precomputed_message(text_encoder, self.text_dim) \
            if encoder is None and is_precomputed(text_encoder) else None
        self.last_timings: dict[str, float] = {}

    # -- loading -------------------------------------------------------------
    @classmethod
    def load(cls, checkpoint: str | Path, index_dir: str | Path, version: str | None = None,
             serve_cfg: ServeConfig | None = None, search_cfg: SearchConfig | None = None,
             encoder: Any = None, load_encoder: bool = True) -> "Retriever":
        """Load the model and its index; refuse an index or text encoder built for another model.

        A model trained on precomputed HDF5 text features (text encoder ``hdf5:<file>``) has no
        encoder to load: it is served without one (token features only)."""
        model, cfg, ckpt = load_model(checkpoint, "cpu")
        index = VideoIndex.load(index_dir)
        manifest = dict(index.manifest or {})
        check_index(manifest, index_dir, checkpoint, ckpt, version)
        version = version or manifest.get("model_version") or "unversioned"
        trained_with = ckpt.get("text_encoder") or manifest.get("text_encoder")
        serve_cfg = serve_cfg or cfg.serve        # default: the settings the checkpoint carries
        if is_precomputed(trained_with):
            logger.warning("model %s was trained on precomputed text features (%s): serving token "
                           "features only; typed queries are refused", version, trained_with)
            encoder = None
        elif encoder is None and load_encoder:
            encoder = TextEncoder.from_config(cfg, threads=serve_cfg.text_threads)
        if encoder is not None:
            check_text_encoder(encoder, trained_with, cfg.model.text_dim)
        engine = make_engine(index, search_cfg or cfg.search)
        fps = manifest.get("fps") or serve_cfg.fps
        retriever = cls(model, cfg, engine, index, encoder, serve_cfg, version, trained_with,
                        float(fps) if fps else None)
        retriever.warmup()
        return retriever

    def warmup(self) -> None:
        """One throw-away query, so the first real request does not pay for lazy initialisation."""
        feats = [np.zeros((2, self.text_dim), np.float32)]
        self.answer([Request({"token_features": feats[0].tolist(), "top_k": 1})])
        if self.encoder is not None:
            self.answer([Request({"query": "warm up", "top_k": 1})])

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, registry: bool = True) -> "Retriever":
        """Load from an unpacked archive (serve.json, model.pt, index/), or from the registry
        when PRVR_REGISTRY_URI is set and ``registry`` (PRVR_REGISTRY_VERSION, default production)."""
        model_dir = Path(model_dir)
        manifest = load_serve_manifest(model_dir)
        serve_cfg = Config.from_dict({"serve": _manifest_value(manifest, "serve", model_dir)}).serve
        search_cfg = Config.from_dict({"search": _manifest_value(manifest, "search", model_dir)}).search
        uri = os.environ.get("PRVR_REGISTRY_URI") if registry else None
        if uri:
            reg = Registry(uri, endpoint_url=os.environ.get("PRVR_REGISTRY_ENDPOINT_URL") or None)
            name = os.environ.get("PRVR_REGISTRY_MODEL") or _manifest_value(manifest, "registry_model", model_dir)
            version = os.environ.get("PRVR_REGISTRY_VERSION") or reg.production(name)
            if not version:
                raise CheckpointError(f"registry {uri} has no production version of {name}")
            local = reg.pull(name, version, model_dir / "registry" / version)
            return cls.load(local / CHECKPOINT, local / INDEX_DIR, version, serve_cfg, search_cfg)
        return cls.load(model_dir / manifest.get("checkpoint", CHECKPOINT),
                        model_dir / manifest.get("index", INDEX_DIR), manifest.get("model_version"),
                        serve_cfg, search_cfg)

    # -- answering -----------------------------------------------------------
    def parse(self, req: Request) -> Query:
        return parse_request(req, self.serve_cfg, self.text_dim, self.default_alpha,
                             features_only=self.encoder is None, refusal=self.refusal)

    @torch.inference_mode()
    def encode(self, queries: Sequence[Query]) -> torch.Tensor:
        """Query vectors (Q, H) of every query of every request, in order."""
        texts = [t for q in queries if q.texts is not None for t in q.texts]
        text_feats = iter(self.encoder.encode(texts, batch_size=max(len(texts), 1)) if texts else [])
        feats: list[np.ndarray] = []
        for q in queries:
            q.vectors = list(range(len(feats), len(feats) + q.count))
            feats += [next(text_feats) for _ in q.texts] if q.texts is not None else q.features
        return encode_token_features(self.model, feats)

    def search(self, vectors: torch.Tensor, queries: Sequence[Query]) -> list[dict[str, Any]]:
        """Rank the corpus for each request (one engine call per distinct alpha)."""
        bodies: list[dict[str, Any]] = [{} for _ in queries]
        by_alpha: dict[float, list[int]] = {}
        for i, q in enumerate(queries):
            by_alpha.setdefault(q.alpha, []).append(i)
        for alpha, members in by_alpha.items():
            rows = [r for i in members for r in queries[i].vectors]
            k = min(max(queries[i].top_k for i in members), self.corpus_size)
            res = self.engine.search(vectors[rows], top_k=k, alpha=alpha)
            arrays = [np.asarray(getattr(res, f)) for f in ("video_idx", "fused", "clip", "frame", "key_clip")]
            pos = 0
            for i in members:
                q = queries[i]
                kq = min(q.top_k, self.corpus_size)
                results = []
                for j in range(q.count):
                    row = [a[pos + j, :kq] for a in arrays]
                    results.append({"query": q.texts[j] if q.texts is not None else None,
                                    "videos": self._videos(*row)})
                pos += q.count
                bodies[i] = {"model_version": self.model_version, "corpus_size": self.corpus_size,
                             "data_version": self.data_version, "top_k": kq, "alpha": alpha,
                             "results": results}
        return bodies

    def _videos(self, vidx, fused, clip, frame, key) -> list[dict[str, Any]]:
        out = []
        for v, s, c, f, kc in zip(vidx.tolist(), fused.tolist(), clip.tolist(), frame.tolist(), key.tolist()):
            info = self.index.describe(v)
            out.append({"video_id": self.video_ids[v], "score": s, "clip_score": c, "frame_score": f,
                        "moment": self._moment(v, kc, info.get("duration_s")), **info})
        return out

    def _moment(self, v: int, key_clip: int, duration_s: float | None) -> dict[str, Any]:
        """The key clip's span and the video's length, in seconds when the frame rate or the
        video's duration is known (the features cover the video evenly), else in feature frames."""
        start, end = (int(x) for x in self.spans[v, key_clip])
        frames = int(self.index.num_frames[v])
        seconds_per_frame = 1 / self.fps if self.fps else (duration_s / frames if duration_s else None)
        if seconds_per_frame is None:
            return {"start": start, "end": end, "unit": "frames", "video_length": frames}
        return {"start": round(start * seconds_per_frame, 3), "end": round(end * seconds_per_frame, 3),
                "unit": "seconds", "video_length": round(frames * seconds_per_frame, 3)}

    def answer(self, requests: Sequence[Request]) -> list[Answer]:
        """One Answer per request; invalid requests get their own 4xx, the rest are served together.

        ``last_timings`` holds this batch's parse / encode / score seconds and query count."""
        t0 = time.perf_counter()
        answers: list[Answer | None] = [None] * len(requests)
        valid: list[tuple[int, Query]] = []
        for i, req in enumerate(requests):
            try:
                valid.append((i, self.parse(req)))
            except RequestError as exc:
                answers[i] = error_answer(exc)
        t1 = t2 = time.perf_counter()
        if valid:
            queries = [q for _, q in valid]
            try:
                vectors = self.encode(queries)
                t2 = time.perf_counter()
                for (i, _), body in zip(valid, self.search(vectors, queries)):
                    answers[i] = Answer(200, body, "ok")
            except Exception as exc:  # noqa: BLE001 - a failed batch must not kill the worker
                logger.exception("answering a batch of %d requests failed", len(valid))
                for i, _ in valid:
                    answers[i] = error_answer(exc)
        t3 = time.perf_counter()
        self.last_timings = {"parse": t1 - t0, "encode": t2 - t1 if valid else 0.0,
                             "score": t3 - t2 if valid else 0.0,
                             "queries": float(sum(q.count for _, q in valid))}
        return [a for a in answers if a is not None]
