"""prvr against the official MS-SL++ code, side by side on one synthetic TVR-like collection.

Both sides run their own code (the official `method/` package imported from --official,
never edited) on the same input tensors, with the same random weights (prvr's state_dict
mapped onto the official model: every tensor has a counterpart; the fixed span pooling and
length encoding hold no weights), the same queries and the same batch sizes (128 videos per
training batch; evaluation: videos encoded 200 at a time and queries scored 50 at a time,
the official eval_context_bsz / eval_query_bsz). Every timed phase runs in a fresh
subprocess per side, which also reports its peak-RSS growth (ru_maxrss).

Measured:
- training: seconds per 128-video batch after warm-up batches (collation, forward, loss,
  backward, optimiser step; prvr's side is prvr.train.train_batch). The official train.py
  also wraps each epoch in torch.autograd.detect_anomaly, left out here;
- clustering of the same span features: seconds per update at equal iterations, and each
  to its own convergence; the medoids picked from the same distances, and with prvr's own;
- evaluation: encoding the test videos (clustering included) and scoring every query
  against every video at batch 50 (the full matrix); prvr's certified top-10 search (the
  exact engine) against the official full matrix + top-k; the metrics of each matrix
  computed by both codes; scores with the official's medoids substituted on prvr's side.

Medoids on model features follow float rounding in both codes (exact ties between spans;
docs/architecture.md): the official disagrees with itself between float32 and float64, so
prvr's own medoids are reported, not required to match; the rest of the model is checked
with the official's medoids. Inputs: views from prvr.views feed both models (the official
reader would pool the clip view without each video's last frame). Weights: prvr's
initialisation with LayerNorm weights and biases spread out (fresh LayerNorms give every
length-1 span the same norm, so the first k-medoids seed would be a rounding lottery).

    python benchmarks/official_compare.py --official ../shared/peers/ms-sl-pp \\
        --out results/official_compare.json --videos 300 2179 --threads 1
    python benchmarks/official_compare.py --official ../shared/peers/ms-sl-pp --out /tmp/oc.json \\
        --videos 24 --queries-per-video 3 --batch-size 8 --train-batches 2 --cluster-videos 6 \\
        --cluster-iters 2 --precision-videos 2                   # smoke run: ~3 minutes
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prvr.config import default_config
from prvr.metrics import retrieval_metrics
from prvr.model import PRVRModel, _Clusters, _kkz_init, _shifted, kmedoids, score
from prvr.search.exact import ExactSearch
from prvr.search.index import VideoIndex
from prvr.synth import PRESETS
from prvr.train import Step, build_optimizer, train_batch
from prvr.views import clip_view, collate_queries, collate_videos, frame_view

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import results as result_files  # noqa: E402 - results/NAME.json and its README block
TEXT_DIM = 768
CONTEXT_BATCH, QUERY_BATCH, TOP_K = 200, 50, 10      # the official eval_context_bsz / eval_query_bsz


# --------------------------------------------------------------------------- #
# The official code, imported from its folder
# --------------------------------------------------------------------------- #
class _AttrDict(dict):
    """Attribute access to keys: a stand-in for easydict.EasyDict, which the official code
    imports, for environments without that package."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def __setattr__(self, name, value):
        self[name] = value


def load_official(root: Path) -> types.SimpleNamespace:
    """The official modules (`method.*`), importable from `root` without editing it."""
    if not (root / "method" / "model.py").is_file():
        raise SystemExit(f"--official {root}: no method/model.py there (a clone of HuiGuanLab/ms-sl-pp?)")
    try:
        importlib.import_module("easydict")
    except ImportError:
        sys.modules["easydict"] = types.SimpleNamespace(EasyDict=_AttrDict)
    sys.path.insert(0, str(root.resolve()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch.cuda.amp.custom_fwd decorators
        mods = {name: importlib.import_module(f"method.{name}")
                for name in ("model", "eval", "optimization", "data_provider", "fast_kmeans")}
    net = mods["model"].MS_SL_Net_pp
    if not getattr(net, "_prvr_squeeze_fix", False):
        # its bare squeeze() drops the batch dimension of a one-query batch (Q = 1 mod 50)
        pooled = net.get_modularized_queries
        net.get_modularized_queries = lambda self, q, m: pooled(self, q, m).reshape(q.shape[0], -1)
        net._prvr_squeeze_fix = True
    return types.SimpleNamespace(**mods)


def official_model(off: types.SimpleNamespace, cfg) -> torch.nn.Module:
    """MS_SL_Net_pp with do_tvr.sh's settings (cluster, length_pos, 32 clusters, margin 0.1)."""
    m = cfg.model
    return off.model.MS_SL_Net_pp(_AttrDict(
        visual_input_size=m.video_dim, query_input_size=m.text_dim, hidden_size=m.hidden_size,
        length_pos=True, cluster=True, cluster_num=m.cluster_num, max_ctx_l=m.max_ctx_len,
        max_desc_l=m.max_desc_len, map_size=m.map_size, input_drop=m.dropout, drop=m.dropout,
        n_heads=m.num_heads, initializer_range=0.02, margin=cfg.train.margin,
        use_hard_negative=False, hard_pool_size=cfg.train.hard_pool_size))


# --------------------------------------------------------------------------- #
# Same weights on both sides
# --------------------------------------------------------------------------- #
ENCODERS = {"query_encoder": "query", "clip_encoder": "clip", "frame_encoder": "frame"}
PLAIN = {"query_pool.weight": "modular_vector_mapping.weight",
         "kcga_key.weight": "mapping_linear.0.weight", "kcga_value.weight": "mapping_linear.1.weight"}
ENCODER_PARTS = {"project.0": "{s}_input_proj.LayerNorm", "project.2": "{s}_input_proj.net.1",
                 "position": "{s}_pos_embed.position_embeddings", "pos_norm": "{s}_pos_embed.LayerNorm",
                 "attention.out": "{s}_encoder.output.dense", "attention.norm": "{s}_encoder.output.LayerNorm"}


def to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """prvr's MS-SL++ state_dict in the official model's names. The fused q/k/v projection
    splits into the official query, key and value layers (same head layout)."""
    out = {PLAIN[k]: v for k, v in sd.items() if k in PLAIN}
    for ours, side in ENCODERS.items():
        for part, theirs in ENCODER_PARTS.items():
            for kind in ("weight", "bias"):
                if f"{ours}.{part}.{kind}" in sd:
                    out[f"{theirs.format(s=side)}.{kind}"] = sd[f"{ours}.{part}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{ours}.attention.qkv.{kind}"].chunk(3)
            for name, t in zip(("query", "key", "value"), (q, k, v)):
                out[f"{side}_encoder.self.{name}.{kind}"] = t
    if len(out) != len(sd) + 2 * len(ENCODERS) * 2:   # each qkv weight/bias became three
        raise RuntimeError("weight mapping left some prvr tensors unmapped")
    return out


def shared_weights(cfg, seed: int) -> dict[str, torch.Tensor]:
    """prvr's initialisation with LayerNorm weights ~ 1 + N(0, 0.1), their biases ~ N(0, 0.1)
    and linear biases ~ N(0, 0.02)."""
    torch.manual_seed(seed)
    model = PRVRModel(cfg.model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))
            elif isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.add_(0.02 * torch.randn_like(module.bias))
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- #
# Data: a TVR-like collection in memory
# --------------------------------------------------------------------------- #
def make_split(n_videos: int, split: int, args) -> dict:
    """Views and token features of `n_videos` videos, each drawn from its own seed (so any
    process rebuilds the same ones): events of random 3072-d means with frame noise, and
    queries whose tokens are a fixed projection of one event plus noise."""
    preset = PRESETS["tvr-like"]
    m = default_config().model
    proj = np.random.default_rng([args.seed, 99]).standard_normal((preset.video_dim, TEXT_DIM)).astype(np.float32)
    units, frames, tokens, labels, cap_ids, video_ids = [], [], [], [], [], []
    lo, median, hi = preset.frames
    for i in range(n_videos):
        rng = np.random.default_rng([args.seed, split, i])
        T = int(np.clip(round(median * np.exp(0.5 * rng.standard_normal())), lo, hi))
        cuts = np.sort(rng.choice(np.arange(1, T), size=int(rng.integers(1, 5)), replace=False))
        means = rng.standard_normal((len(cuts) + 1, preset.video_dim)).astype(np.float32)
        raw = means[np.searchsorted(cuts, np.arange(T), side="right")]
        raw = raw + preset.noise_std * rng.standard_normal(raw.shape, dtype=np.float32)
        units.append(clip_view(raw, m.map_size))
        frames.append(frame_view(raw, m.max_ctx_len))
        vid = f"v{split}{i:06d}"
        video_ids.append(vid)
        for q in range(args.queries_per_video):
            event = means[rng.integers(len(means))] @ proj / np.sqrt(preset.video_dim)
            toks = event + 0.8 * rng.standard_normal((int(rng.integers(8, 21)), TEXT_DIM), dtype=np.float32)
            tokens.append((toks / np.linalg.norm(toks, axis=-1, keepdims=True)).astype(np.float32))
            labels.append(i)
            cap_ids.append(f"{vid}#enc#{q}")
    return {"units": units, "frames": frames, "tokens": tokens, "labels": np.array(labels),
            "cap_ids": cap_ids, "video_ids": video_ids}


def config():
    """prvr's packaged settings with TVR's dims and margin."""
    cfg = default_config()
    cfg.model.video_dim, cfg.model.text_dim = PRESETS["tvr-like"].video_dim, TEXT_DIM
    cfg.train.margin = 0.1      # do_tvr.sh
    return cfg


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


# --------------------------------------------------------------------------- #
# Workers: one side, one task, one fresh process
# --------------------------------------------------------------------------- #
def train_batches(data: dict, args) -> list[list[int]]:
    n = len(data["video_ids"])
    return [list(range(s, s + args.batch_size)) for s in range(0, n, args.batch_size)]


class _MemoryVideos:
    """VideoSource over in-memory views (what prvr.train.train_batch asks of it)."""

    def __init__(self, data: dict):
        self.data, self.index = data, {v: i for i, v in enumerate(data["video_ids"])}

    def batch(self, video_ids: list[str]):
        d = self.data
        return collate_videos([(d["units"][i], d["frames"][i], len(d["frames"][i]))
                               for i in (self.index[v] for v in video_ids)])


class _MemoryTexts:
    """TextSource over in-memory token features."""

    def __init__(self, data: dict):
        self.data, self.index = data, {c: i for i, c in enumerate(data["cap_ids"])}

    def get(self, cap_ids: list[str]) -> list[np.ndarray]:
        return [self.data["tokens"][self.index[c]] for c in cap_ids]


def train_prvr(data: dict, args) -> list[float]:
    """prvr.train.train_batch itself (collation, lr schedule, loss, clipping, AdamW step)."""
    cfg = config()
    model = PRVRModel(cfg.model)
    model.load_state_dict(shared_weights(cfg, args.seed))
    model.train()
    queries_of: dict[str, list[str]] = {}
    for cap, label in zip(data["cap_ids"], data["labels"]):
        queries_of.setdefault(data["video_ids"][label], []).append(cap)
    step = Step(cfg=cfg, device=torch.device("cpu"), texts=_MemoryTexts(data), videos=_MemoryVideos(data),
                queries_of=queries_of, model=model, net=model, optimizer=build_optimizer(model, cfg),
                total_steps=100 * 137, state={"step": 0, "lr_scale": 1.0}, amp=False)
    gen = torch.Generator().manual_seed(args.seed)
    times = []
    for vids in train_batches(data, args):
        t0 = time.perf_counter()
        train_batch(step, [data["video_ids"][v] for v in vids], hard=False, gen=gen)
        times.append(time.perf_counter() - t0)
    return times


def train_official(data: dict, args) -> list[float]:
    off, cfg = load_official(Path(args.official)), config()
    model = official_model(off, cfg)
    model.load_state_dict(to_official(shared_weights(cfg, args.seed)))
    model.train()
    # the official grouping: no weight decay on biases and LayerNorm weights
    named = list(model.named_parameters())
    plain = ("bias", "LayerNorm.bias", "LayerNorm.weight")
    groups = [{"params": [p for n, p in named if not any(s in n for s in plain)], "weight_decay": 0.01},
              {"params": [p for n, p in named if any(s in n for s in plain)], "weight_decay": 0.0}]
    opt = off.optimization.BertAdam(groups, lr=cfg.train.lr, weight_decay=0.01, warmup=0.01,
                                    t_total=100 * 137, schedule="warmup_linear")  # TVR: 100 x 137 batches
    torch.manual_seed(args.seed)
    times = []
    for vids in train_batches(data, args):      # collation timed, as train_batch's on prvr's side
        items = [(torch.from_numpy(data["units"][v]).unsqueeze(0), torch.from_numpy(data["frames"][v]),
                  [torch.from_numpy(data["tokens"][j]) for j in np.nonzero(data["labels"] == v)[0]],
                  v, None, data["video_ids"][v]) for v in vids]
        t0 = time.perf_counter()
        b = off.data_provider.collate_train(items)
        loss, _ = model(b["clip_video_features"], b["frame_video_features"], b["videos_mask"],
                        b["text_feat"], b["text_mask"], b["text_labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def encode_all(model: PRVRModel, data: dict):
    """Every test video, CONTEXT_BATCH at a time: clips, attended vectors, spans."""
    n, parts = len(data["video_ids"]), []
    for s in range(0, n, CONTEXT_BATCH):
        vb = collate_videos([(data["units"][v], data["frames"][v], len(data["frames"][v]))
                             for v in range(s, min(n, s + CONTEXT_BATCH))])
        parts.append(model.encode_videos(vb.units, vb.frames, vb.frame_mask))
    return (torch.cat([p.clips for p in parts]), torch.cat([p.attended for p in parts]),
            torch.cat([p.spans for p in parts]))


def query_vectors(model: PRVRModel, data: dict, start: int) -> torch.Tensor:
    tokens, mask = collate_queries(data["tokens"][start:start + QUERY_BATCH], model.cfg.max_desc_len)
    return model.encode_queries(tokens, mask)


def score_all(model: PRVRModel, data: dict, clips, attended) -> tuple[dict[str, np.ndarray], float]:
    """The full (Q, V) matrices, QUERY_BATCH queries at a time (the corpus normalised once),
    and the seconds spent encoding the queries."""
    clips, attended = F.normalize(clips.float(), dim=-1), F.normalize(attended.float(), dim=-1)
    parts, encoding = [], 0.0
    for s in range(0, len(data["tokens"]), QUERY_BATCH):
        q, t = timed(lambda: query_vectors(model, data, s))
        encoding += t
        parts.append(score(q, clips, attended, model.cfg.alpha, unit=True))
    return {k: torch.cat([getattr(p, k) for p in parts]).numpy() for k in ("fused", "clip", "frame")}, encoding


def with_medoids(model: PRVRModel, data: dict, medoids: np.ndarray) -> dict[str, np.ndarray]:
    """Scores when prvr keeps the clips the official picked (its cluster_spans replaced):
    everything but the clustering compared."""
    batches = iter(torch.from_numpy(medoids).split(CONTEXT_BATCH))
    model.cluster_spans = lambda enc_units: next(batches)
    try:
        clips, attended, _ = encode_all(model, data)
        return score_all(model, data, clips, attended)[0]
    finally:
        del model.cluster_spans


def eval_prvr(data: dict, args, out: Path) -> dict:
    cfg = config()
    model = PRVRModel(cfg.model).eval()
    model.load_state_dict(shared_weights(cfg, args.seed))
    where = {tuple(s): i for i, s in enumerate(model.spans.tolist())}
    batches = range(0, len(data["tokens"]), QUERY_BATCH)
    rss0 = peak_rss_gib()
    with torch.no_grad():
        (clips, attended, spans), t_encode = timed(lambda: encode_all(model, data))
        (scores, t_queries), t_score = timed(lambda: score_all(model, data, clips, attended))
        engine, t_index = timed(lambda: ExactSearch(VideoIndex.from_arrays(     # unit vectors, as an index
            F.normalize(clips, dim=-1).numpy(), F.normalize(attended, dim=-1).numpy(), alpha=cfg.model.alpha)))
        found, t_search = timed(lambda: [engine.search(query_vectors(model, data, s), TOP_K) for s in batches])
        rss = peak_rss_gib() - rss0
        forced = with_medoids(model, data, np.load(args.official_medoids)["medoids"])
    medoids = np.array([[where[tuple(x)] for x in row] for row in spans.tolist()])
    np.savez(out, medoids=medoids, top=torch.cat([f.video_idx for f in found]).numpy(), **scores,
             **{f"{k}_official_medoids": v for k, v in forced.items()})
    return {"encode_videos_s": t_encode, "score_matrix_s": t_score, "query_encoding_s": t_queries,
            "search_index_s": t_index,
            "search_top10_s": t_search, "search_precision": engine.precision,
            "search_fallbacks": engine.stats["fallbacks"], "peak_rss_growth_gib": rss}


class _Videos(torch.utils.data.Dataset):
    """The official evaluation's video items (clip view, frame view, index, id) from memory."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data["video_ids"])

    def __getitem__(self, i):
        d = self.data
        return torch.from_numpy(d["units"][i]).unsqueeze(0), torch.from_numpy(d["frames"][i]), i, d["video_ids"][i]


class _Queries(torch.utils.data.Dataset):
    """The official evaluation's query items (token features, index, cap_id) from memory."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data["cap_ids"])

    def __getitem__(self, i):
        return torch.from_numpy(self.data["tokens"][i]), i, self.data["cap_ids"][i]


def eval_official(data: dict, args, out: Path) -> dict:
    off, cfg = load_official(Path(args.official)), config()
    model = official_model(off, cfg).eval()
    model.load_state_dict(to_official(shared_weights(cfg, args.seed)))
    picked = []
    cluster = off.model.batch_fast_kmedoids_with_split

    def recorded(*a, **kw):     # the medoids its encode_feat_map picks, in video order
        assign, medoids = cluster(*a, **kw)
        picked.append(medoids)
        return assign, medoids

    off.model.batch_fast_kmedoids_with_split = recorded
    encoding = [0.0]
    encode_query = model.encode_query

    def timed_encode_query(*a, **kw):       # its query encoder, timed inside its own scoring loop
        result, t = timed(lambda: encode_query(*a, **kw))
        encoding[0] += t
        return result

    model.encode_query = timed_encode_query
    opt = _AttrDict(eval_context_bsz=CONTEXT_BATCH, eval_query_bsz=QUERY_BATCH, num_workers=0,
                    pin_memory=False, device=torch.device("cpu"), hidden_size=cfg.model.hidden_size)
    rss0 = peak_rss_gib()
    with torch.no_grad():
        ctx, t_encode = timed(lambda: off.eval.compute_context_info(model, _Videos(data), opt))
        (clip, frame, fused, metas), t_score = timed(
            lambda: off.eval.compute_query2ctx_info(model, _Queries(data), opt, ctx))
        top, t_topk = timed(lambda: torch.from_numpy(fused).topk(TOP_K, dim=1).indices)
    rss = peak_rss_gib() - rss0
    position = {c: i for i, c in enumerate(data["cap_ids"])}
    order = np.argsort([position[c] for c in metas])          # its batches sort queries by length
    _, t2v = off.eval.get_gt(ctx["video_metas"], metas)
    r1, r5, r10, r100, _, _ = off.eval.eval_q2m(-fused, t2v)
    np.savez(out, fused=fused[order], clip=clip[order], frame=frame[order],
             medoids=torch.cat(picked).numpy(), top=top.numpy()[order])
    return {"encode_videos_s": t_encode, "score_matrix_s": t_score, "query_encoding_s": encoding[0], "topk_s": t_topk,
            "own_metrics_own_matrix": {"r1": r1, "r5": r5, "r10": r10, "r100": r100,
                                       "sumr": r1 + r5 + r10 + r100},
            "peak_rss_growth_gib": rss}


def span_points(data: dict, args) -> tuple[torch.Tensor, torch.Tensor, PRVRModel]:
    """Encoded clip units of the first --cluster-videos test videos and their explicit
    [span feature ; length encoding] vectors (what the official clusters)."""
    cfg = config()
    model = PRVRModel(cfg.model).eval()
    model.load_state_dict(shared_weights(cfg, args.seed))
    units = torch.from_numpy(np.stack(data["units"][:args.cluster_videos]))
    with torch.no_grad():
        enc = model.clip_encoder(units, torch.ones(units.shape[:2], dtype=torch.bool))
        lengths = model.spans[:, 1] - model.spans[:, 0] - 1
        pts = torch.cat([model.span_pool @ enc, model.length_table[lengths].expand(len(enc), -1, -1)], -1)
    return enc, pts, model


def cluster_prvr(data: dict, args, out: Path) -> dict:
    enc, pts, model = span_points(data, args)
    K, I, m = model.cfg.cluster_num, args.cluster_iters, model.cfg
    rss0 = peak_rss_gib()
    (dist, norms), t_dist = timed(lambda: model.span_distances(enc))
    full, t_full = timed(lambda: kmedoids(dist, norms, K, m.kmedoids_iters, m.kmedoids_tol))
    _, t_zero = timed(lambda: kmedoids(dist, norms, K, 0))
    _, t_iters = timed(lambda: kmedoids(dist, norms, K, I, tol=-1.0))     # never stops early
    rss = peak_rss_gib() - rss0
    same_input = kmedoids(torch.cdist(pts, pts), pts.norm(dim=-1), K, m.kmedoids_iters, m.kmedoids_tol)
    iters, min_shift = convergence(dist, norms, K, m.kmedoids_iters, m.kmedoids_tol)
    few = slice(0, args.precision_videos)
    model64 = model.double()
    d64, n64 = model64.span_distances(enc[few].double())
    in64 = kmedoids(d64, n64, K, m.kmedoids_iters, m.kmedoids_tol)
    np.savez(out, gram=full.numpy(), explicit=same_input.numpy())
    return {"distances_s": t_dist, "to_convergence_s": t_full + t_dist, "kmedoids_to_convergence_s": t_full,
            "seed_only_s": t_zero, f"{I}_iterations_s": t_iters, "per_iteration_s": (t_iters - t_zero) / I,
            "iterations_per_video": {"mean": float(iters.mean()), "max": int(iters.max()),
                                     "at_limit": int((iters >= m.kmedoids_iters).sum())},
            "official_chunk_iterations": [int(iters[s:s + 64].max()) for s in range(0, len(iters), 64)],
            "smallest_nonzero_medoid_shift": min_shift, "peak_rss_growth_gib": rss,
            "float32_vs_float64_equal_videos": f"{int((in64 == full[few]).all(1).sum())} of {len(in64)}"}


def convergence(dist, norms, k: int, limit: int, tol: float) -> tuple[np.ndarray, float]:
    """Updates each video takes to its own stop, and the smallest non-zero summed shift seen:
    the official stops 64 videos together on their mean shift, which can only differ from
    per-video stopping if a video moves by less than 64 * tol."""
    shifted = _shifted(dist)
    medoids, rows = _kkz_init(shifted, norms, k), torch.arange(len(dist))[:, None]
    iters, active, smallest = np.zeros(len(dist), int), torch.ones(len(dist), dtype=torch.bool), float("inf")
    state, every = _Clusters(shifted), torch.arange(len(dist))
    for _ in range(limit):
        new = state.update(every, medoids)
        shift = (dist[rows, new, medoids] * (new != medoids)).sum(-1)
        if (shift > 0).any():
            smallest = min(smallest, float(shift[shift > 0].min()))
        iters += active.numpy()
        active &= shift >= tol
        medoids = new
    return iters, smallest


def cluster_official(data: dict, args, out: Path) -> dict:
    off = load_official(Path(args.official))
    _, pts, model = span_points(data, args)
    K, I = model.cfg.cluster_num, args.cluster_iters
    split = 64 if K < 64 else 16 if K < 256 else 8          # as its encode_feat_map chooses
    fn = off.fast_kmeans.batch_fast_kmedoids_with_split
    rss0 = peak_rss_gib()
    (_, full), t_full = timed(lambda: fn(pts, K, split_size=split))
    _, t_zero = timed(lambda: fn(pts, K, iter_limit=0, threshold=-1.0, split_size=split))
    _, t_iters = timed(lambda: fn(pts, K, iter_limit=I, threshold=-1.0, split_size=split))
    rss = peak_rss_gib() - rss0
    alone = fn(pts, K, split_size=1)[1]                       # one video per group, as prvr stops
    few = slice(0, args.precision_videos)
    in64 = fn(pts[few].double(), K, split_size=split)[1]      # the same points in float64
    np.savez(out, medoids=full.numpy(), alone=alone.numpy())
    return {"to_convergence_s": t_full, "seed_only_s": t_zero, f"{I}_iterations_s": t_iters,
            "per_iteration_s": (t_iters - t_zero) / I, "split_size": split, "peak_rss_growth_gib": rss,
            "groups_vs_one_video_at_a_time_equal_videos": int((alone == full).all(1).sum()),
            "float32_vs_float64_equal_videos": f"{int((in64 == full[few]).all(1).sum())} of {len(in64)}"}


def worker(args) -> None:
    """One (side, task) in this process; its figures go to --worker-out as JSON."""
    torch.set_num_threads(args.threads)
    side, task = args.worker
    out = Path(args.worker_out)
    if task == "train":
        data = make_split(args.batch_size * args.train_batches, 0, args)
        rss0 = peak_rss_gib()
        times = (train_prvr if side == "prvr" else train_official)(data, args)
        result = {"batch_s": times, "s_per_batch": float(np.mean(times[args.warmup:])), "warmup_batches": args.warmup,
                  "peak_rss_growth_gib": peak_rss_gib() - rss0}
    else:
        n = args.cluster_videos if task == "cluster" else args.eval_videos
        data = make_split(n, 1, args)
        fn = {("prvr", "eval"): eval_prvr, ("official", "eval"): eval_official,
              ("prvr", "cluster"): cluster_prvr, ("official", "cluster"): cluster_official}[(side, task)]
        result = fn(data, args, out.with_suffix(".npz"))
    result["peak_rss_gib"] = peak_rss_gib()
    out.write_text(json.dumps(result))


# --------------------------------------------------------------------------- #
# The driver: spawn the workers, compare, write one JSON
# --------------------------------------------------------------------------- #
def spawn(side: str, task: str, args, tmp: Path, videos: int = 0) -> dict:
    out = tmp / f"{side}-{task}-{videos}.json"
    cmd = [sys.executable, __file__, "--official", args.official, "--out", args.out, "--worker", side, task,
           "--worker-out", str(out), "--eval-videos", str(videos), "--threads", str(args.threads),
           "--official-medoids", str(tmp / f"official-eval-{videos}.npz")]
    for name in ("queries_per_video", "batch_size", "train_batches", "warmup", "cluster_videos",
                 "cluster_iters", "precision_videos", "seed"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    print(f"[official_compare] {side} {task} {videos or ''}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def compare_eval(tmp: Path, videos: int, off) -> dict:
    """Checks on the two evaluation outputs: medoids, scores, metrics, top-10."""
    ours, theirs = np.load(tmp / f"prvr-eval-{videos}.npz"), np.load(tmp / f"official-eval-{videos}.npz")
    labels = np.repeat(np.arange(videos), len(ours["fused"]) // videos)
    same = (ours["medoids"] == theirs["medoids"]).all(1)                     # (V,)
    metrics = {}
    for name, matrix in (("prvr_matrix", ours["fused"]), ("official_matrix", theirs["fused"])):
        r1, r5, r10, r100, _, _ = off.eval.eval_q2m(-matrix, {i: [int(v)] for i, v in enumerate(labels)})
        mine = retrieval_metrics(matrix, labels)
        official = {"r1": r1, "r5": r5, "r10": r10, "r100": r100, "sumr": r1 + r5 + r10 + r100}
        metrics[name] = {"official_code": official, "prvr_code": {k: mine[k] for k in official},
                         "equal": all(abs(official[k] - mine[k]) < 1e-9 for k in official)}
    full_top = np.argsort(-ours["fused"], axis=1, kind="stable")[:, :TOP_K]
    return {"videos_with_equal_medoids": int(same.sum()), "videos": int(len(same)),
            "max_abs_score_diff_with_official_medoids": {
                k: float(np.abs(ours[f"{k}_official_medoids"] - theirs[k]).max()) for k in ("fused", "clip", "frame")},
            "pairs_fused_diff_above_1e-6_with_official_medoids": int(
                (np.abs(ours["fused_official_medoids"] - theirs["fused"]) > 1e-6).sum()),
            "pairs": int(ours["fused"].size),
            "max_abs_fused_diff_own_medoids": float(np.abs(ours["fused"] - theirs["fused"]).max()),
            "metrics": metrics,
            "search_top10_equals_full_matrix_top10": float(np.mean(
                [set(a) == set(b) for a, b in zip(ours["top"], full_top)])),
            "search_top10_overlap_with_official_top10": float(np.mean(
                [len(set(a) & set(b)) / TOP_K for a, b in zip(ours["top"], theirs["top"])]))}


def eval_block(videos: int, args, tmp: Path, off) -> dict:
    official = spawn("official", "eval", args, tmp, videos)      # first: prvr's run reads its medoids
    prvr_ = spawn("prvr", "eval", args, tmp, videos)
    queries = videos * args.queries_per_video
    ours_eval = prvr_["encode_videos_s"] + prvr_["score_matrix_s"]
    theirs_eval = official["encode_videos_s"] + official["score_matrix_s"]
    return {"videos": videos, "queries": queries, "prvr": prvr_, "official": official,
            "eval_speedup": theirs_eval / ours_eval,
            "score_speedup": official["score_matrix_s"] / prvr_["score_matrix_s"],
            "score_speedup_without_query_encoding": (official["score_matrix_s"] - official["query_encoding_s"])
            / (prvr_["score_matrix_s"] - prvr_["query_encoding_s"]),
            "query_encoding_speedup": official["query_encoding_s"] / prvr_["query_encoding_s"],
            "score_us_per_query_video": {"prvr": 1e6 * prvr_["score_matrix_s"] / (queries * videos),
                                         "official": 1e6 * official["score_matrix_s"] / (queries * videos)},
            "search_speedup": (official["score_matrix_s"] + official["topk_s"]) / prvr_["search_top10_s"],
            "checks": compare_eval(tmp, videos, off)}


def meta(args) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()

    def git(*a, cwd=REPO):
        r = subprocess.run(["git", *a], cwd=cwd, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    return {"machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
            "official": {"path": str(Path(args.official).resolve()),
                         "commit": git("rev-parse", "HEAD", cwd=args.official)
                         if (Path(args.official) / ".git").exists() else None},
            "command": [sys.executable, *sys.argv], "torch": torch.__version__, "python": platform.python_version(),
            "threads": args.threads, "load_average_at_start": os.getloadavg()}


def run(args, save) -> dict:
    """Every comparison; `save(result)` after each part, so a long run keeps what it measured."""
    off = load_official(Path(args.official))
    result = {"meta": meta(args), "complete": False, "eval": {}}
    with tempfile.TemporaryDirectory(prefix="prvr-official-") as tmp_name:
        tmp = Path(tmp_name)
        ours, theirs = spawn("prvr", "train", args, tmp), spawn("official", "train", args, tmp)
        result["train"] = {"videos_per_batch": args.batch_size, "prvr": ours, "official": theirs,
                           "train_speedup": theirs["s_per_batch"] / ours["s_per_batch"]}
        ours, theirs = spawn("prvr", "cluster", args, tmp), spawn("official", "cluster", args, tmp)
        picked = np.load(tmp / "official-cluster-0.npz")
        mine = np.load(tmp / "prvr-cluster-0.npz")
        result["clustering"] = {
            "videos": args.cluster_videos, "k": default_config().model.cluster_num, "prvr": ours, "official": theirs,
            "kmedoids_speedup_equal_iters": theirs["per_iteration_s"] / ours["per_iteration_s"],
            "speedup_to_convergence": theirs["to_convergence_s"] / ours["to_convergence_s"],
            "equal_medoids_given_the_official_distances": {
                "official_in_its_groups": int((mine["explicit"] == picked["medoids"]).all(1).sum()),
                "official_one_video_at_a_time": int((mine["explicit"] == picked["alone"]).all(1).sum())},
            "equal_medoids_prvr_distances": int((mine["gram"] == picked["medoids"]).all(1).sum())}
        save(result)
        for n in args.videos:
            result["eval"][str(n)] = eval_block(n, args, tmp, off)
            result["meta"]["load_average_at_end"] = os.getloadavg()
            result["complete"] = n == args.videos[-1]
            save(result)
    return result


def _f(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def markdown(r: dict) -> str:
    """The README table: each side's figure and the ratio, and the equality checks."""
    t, c = r["train"], r["clustering"]
    rows = [(f"training, s per {t['videos_per_batch']}-video batch (forward, loss, backward, step)",
             t["prvr"]["s_per_batch"], t["official"]["s_per_batch"], t["train_speedup"]),
            (f"k-medoids, s per update at equal iterations ({c['videos']} videos)",
             c["prvr"]["per_iteration_s"], c["official"]["per_iteration_s"], c["kmedoids_speedup_equal_iters"]),
            (f"k-medoids to each one's own convergence ({c['videos']} videos), s",
             c["prvr"]["to_convergence_s"], c["official"]["to_convergence_s"], c["speedup_to_convergence"])]
    for n, e in r["eval"].items():
        p, o = e["prvr"], e["official"]
        rows += [(f"{n} videos: encoding the videos (clustering included), s",
                  p["encode_videos_s"], o["encode_videos_s"], o["encode_videos_s"] / p["encode_videos_s"]),
                 (f"{n} videos: full score matrix, {e['queries']} queries at batch {QUERY_BATCH}, s",
                  p["score_matrix_s"], o["score_matrix_s"], e["score_speedup"]),
                 (f"{n} videos: of which query encoding, s",
                  p["query_encoding_s"], o["query_encoding_s"], e["query_encoding_speedup"]),
                 (f"{n} videos: of which scoring, us per query and video",
                  1e6 * (p["score_matrix_s"] - p["query_encoding_s"]) / (e["queries"] * int(n)),
                  1e6 * (o["score_matrix_s"] - o["query_encoding_s"]) / (e["queries"] * int(n)),
                  e["score_speedup_without_query_encoding"]),
                 (f"{n} videos: evaluation end to end (encoding + full matrix), s",
                  p["encode_videos_s"] + p["score_matrix_s"], o["encode_videos_s"] + o["score_matrix_s"],
                  e["eval_speedup"]),
                 (f"{n} videos: top-{TOP_K} of every query (prvr: certified search; official: matrix + top-k), s",
                  p["search_top10_s"], o["score_matrix_s"] + o["topk_s"], e["search_speedup"])]
    lines = ["| measured on the same data, 1 process per side | prvr | official | official / prvr |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {_f(a)} | {_f(b)} | {_f(ratio)}x |" for name, a, b, ratio in rows]
    checks = ["", "| check | result |", "|---|---|"]
    for n, e in r["eval"].items():
        k = e["checks"]
        m = k["metrics"]
        checks += [f"| {n} videos: metrics of each matrix, prvr's code = official code | "
                   f"{'equal' if all(v['equal'] for v in m.values()) else 'DIFFERENT'} "
                   f"(SumR prvr matrix {m['prvr_matrix']['prvr_code']['sumr']:.1f}, "
                   f"official matrix {m['official_matrix']['official_code']['sumr']:.1f}) |",
                   f"| {n} videos: with the official's medoids, largest clip-scale score difference | "
                   f"{k['max_abs_score_diff_with_official_medoids']['clip']:.1e} |",
                   f"| {n} videos: with the official's medoids, pairs whose fused score differs by over 1e-6 "
                   f"(a near-tie of two clips picks another key clip) | "
                   f"{k['pairs_fused_diff_above_1e-6_with_official_medoids']} of {k['pairs']:,} |",
                   f"| {n} videos: videos whose medoids equal the official's (model features) | "
                   f"{k['videos_with_equal_medoids']} of {k['videos']} |",
                   f"| {n} videos: certified top-{TOP_K} = our full-matrix top-{TOP_K} | "
                   f"{100 * k['search_top10_equals_full_matrix_top10']:.1f}% of queries |"]
    eq, n_c, o = c["equal_medoids_given_the_official_distances"], c["videos"], c["official"]
    checks += [f"| clustering, same explicit points: prvr's medoids = the official's run one video at a time | "
               f"{eq['official_one_video_at_a_time']} of {n_c} videos |",
               f"| clustering, same explicit points: prvr's medoids = the official's in its groups of "
               f"{o['split_size']} | {eq['official_in_its_groups']} of {n_c} videos |",
               f"| clustering: the official in groups = itself one video at a time | "
               f"{o['groups_vs_one_video_at_a_time_equal_videos']} of {n_c} videos |",
               f"| clustering: the official on float32 = itself on float64 points | "
               f"{o['float32_vs_float64_equal_videos']} videos |"]
    threads = r["meta"]["threads"]
    note = (f"\n\n{threads} thread per side; each side and task in a fresh process. "
            "k-medoids at equal iterations: prvr recomputes only the cost rows of clusters that changed.")
    if not r.get("complete"):
        note += " **Partial run**: not every evaluation size has finished."
    return "\n".join(lines + checks) + note


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", required=True, help="folder of the official MS-SL++ code (its method/)")
    p.add_argument("--out", required=True, help="JSON file to write (atomically)")
    p.add_argument("--videos", type=int, nargs="+", default=[300, 2179], help="test videos per evaluation run")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    p.add_argument("--queries-per-video", type=int, default=PRESETS["tvr-like"].queries[1])
    p.add_argument("--batch-size", type=int, default=128, help="videos per training batch")
    p.add_argument("--train-batches", type=int, default=3, help="training batches per side, warm-up included")
    p.add_argument("--warmup", type=int, default=1, help="first batches left out of the training time")
    p.add_argument("--cluster-videos", type=int, default=64, help="videos in the clustering comparison")
    p.add_argument("--cluster-iters", type=int, default=10, help="update iterations in the equal-iteration timing")
    p.add_argument("--precision-videos", type=int, default=8,
                   help="videos clustered again in float64 (how much rounding decides the medoids)")
    p.add_argument("--seed", type=int, default=2018)
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "TASK"), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--eval-videos", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--official-medoids", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup >= args.train_batches:
        p.error("--warmup must leave at least one timed batch (--train-batches > --warmup)")
    for name in ("videos", "threads", "queries_per_video", "batch_size", "cluster_videos", "cluster_iters",
                 "precision_videos"):
        value = getattr(args, name)
        if min(value if isinstance(value, list) else [value]) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.precision_videos > args.cluster_videos:
        p.error(f"--precision-videos ({args.precision_videos}) must be <= --cluster-videos ({args.cluster_videos})")
    if args.worker:
        worker(args)
        return 0
    out, started = Path(args.out), result_files.meta()

    def save(result: dict) -> None:
        if "clustering" in result:
            result_files.write(out.stem, result, markdown(result), folder=out.parent, started=started)

    result = run(args, save)
    summary = {"train_speedup": result["train"]["train_speedup"],
               "kmedoids_speedup_equal_iters": result["clustering"]["kmedoids_speedup_equal_iters"],
               **{f"{k}@{n}": v[k] for n, v in result["eval"].items()
                  for k in ("eval_speedup", "score_speedup", "search_speedup")}}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
