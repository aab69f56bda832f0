"""Search benchmark: exact and ANN engines, and a re-implementation of MS-SL's evaluation path.

Corpora are random unit vectors (K=32 clips and K attended vectors of H=384 per
video). `--corpus structured` (default) gives them the structure measured on a
trained MS-SL++ index (demo model, 300 test videos): clips of one video have mean
cosine ~0.56 with each other, attended vectors ~0.67, a clip and an attended vector
~0.0; videos fall into topics. `--corpus isotropic` draws every vector independently
(no structure at all: the worst case for any ANN index). Queries are noisy copies of
a random video's clip + attended vector. Prints a table; `--out FILE` writes JSON.

`mssl528_*` figures time MS-SL's evaluation (all 528 spans of a video scored, a full
query x video matrix, key-clip guided attention per pair) re-implemented here, at the same
query batch as the exact engine's `exact_ms_b50`, which returns a top-10. MS-SL++'s own
evaluation keeps 32 medoid clips per video: benchmarks/official_compare.py runs the
official code for that comparison.

    PYTHONPATH=. python benchmarks/search_bench.py --quick
    PYTHONPATH=. python benchmarks/search_bench.py --sizes 2179,10000,100000 --out bench.json
    PYTHONPATH=. python benchmarks/search_bench.py --sizes 1000000 --workdir /tmp/bench1m
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prvr.config import SearchConfig, default_config
from prvr.search.ann import FaissSearch, ann_params, train_and_add
from prvr.search.exact import ExactSearch
from prvr.search.index import VideoIndex

K, H, T = 32, 384, 128
ALPHA = default_config().model.alpha    # the synthetic corpora stand for a model trained with params.yaml


def rss_gib() -> float:
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2 ** 30
    except ImportError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def memory_gib() -> dict[str, float]:
    """Resident memory split: private (anon: faiss codes, arrays in RAM) and mapped file pages
    (the memory-mapped index rows touched so far, reclaimable page cache)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = round(int(val.split()[0]) / 2 ** 20, 2)
    except OSError:
        pass
    return out


def faiss_bytes(index, workdir: str) -> int:
    """Size of the index as `prvr index build --ann` stores it (written once, then removed)."""
    import faiss
    path = Path(workdir) / f"probe-{os.getpid()}.faiss"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        faiss.write_index(index, str(path))
        return path.stat().st_size
    finally:
        path.unlink(missing_ok=True)


def median_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3)


def random_unit(n: int, gen: torch.Generator, dtype=np.float32) -> np.ndarray:
    return F.normalize(torch.randn(n, K, H, generator=gen), dim=-1).numpy().astype(dtype, copy=False)


def _mix(base: torch.Tensor, rho: float, gen: torch.Generator) -> torch.Tensor:
    """Unit vectors around `base` (unit): two of them sharing the base have cosine ~rho."""
    noise = F.normalize(torch.randn(base.shape, generator=gen), dim=-1)
    return F.normalize(base + noise * ((1 - rho) / rho) ** 0.5, dim=-1)


class StructuredCorpus:
    """Topics -> videos -> clips / attended vectors with the similarity structure of a trained index."""

    CLIP_WITHIN, ATT_WITHIN, TOPIC = 0.56, 0.67, 0.5

    def __init__(self, N: int, seed: int):
        g = torch.Generator().manual_seed(seed + 7)
        self.topics = max(10, N // 100)
        self.clip_topics = F.normalize(torch.randn(self.topics, H, generator=g), dim=-1)
        self.att_topics = F.normalize(torch.randn(self.topics, H, generator=g), dim=-1)

    def chunk(self, n: int, gen: torch.Generator, dt) -> tuple[np.ndarray, np.ndarray]:
        t = torch.randint(0, self.topics, (n,), generator=gen)
        u = _mix(self.clip_topics[t], self.TOPIC, gen)[:, None].expand(n, K, H)
        w = _mix(self.att_topics[t], self.TOPIC, gen)[:, None].expand(n, K, H)
        return (_mix(u, self.CLIP_WITHIN, gen).numpy().astype(dt, copy=False),
                _mix(w, self.ATT_WITHIN, gen).numpy().astype(dt, copy=False))


def corpus_chunk(n: int, gen: torch.Generator, dt, structure: "StructuredCorpus | None"):
    if structure is None:
        return random_unit(n, gen, dt), random_unit(n, gen, dt)
    return structure.chunk(n, gen, dt)


def make_corpus(N: int, seed: int, dtype: str, workdir: Path | None, chunk: int = 20000,
                kind: str = "structured") -> VideoIndex:
    """Random corpus; written in chunks straight into .npy memmaps when `workdir` is given."""
    gen = torch.Generator().manual_seed(seed)
    dt = np.float16 if dtype == "float16" else np.float32
    structure = StructuredCorpus(N, seed) if kind == "structured" else None
    if workdir is None:
        parts = [corpus_chunk(min(chunk, N - s), gen, dt, structure) for s in range(0, N, chunk)]
        return VideoIndex.from_arrays(np.concatenate([p[0] for p in parts]),
                                      np.concatenate([p[1] for p in parts]), alpha=ALPHA)
    workdir.mkdir(parents=True, exist_ok=True)
    files = {name: workdir / f"{kind}_{name}_{N}_{dtype}.npy" for name in ("clips", "attended")}
    if not all(f.exists() for f in files.values()):
        mms = {name: np.lib.format.open_memmap(f, "w+", dt, (N, K, H)) for name, f in files.items()}
        for s in range(0, N, chunk):
            c, a = corpus_chunk(min(chunk, N - s), gen, dt, structure)
            mms["clips"][s:s + chunk], mms["attended"][s:s + chunk] = c, a
        for mm in mms.values():
            mm.flush()
        del mms
    arrays = {name: np.load(f, mmap_mode="r") for name, f in files.items()}
    return VideoIndex.from_arrays(arrays["clips"], arrays["attended"], alpha=ALPHA)


def make_queries(index: VideoIndex, Q: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    vids, clips = rng.integers(0, index.count, Q), rng.integers(0, K, Q)
    clip = torch.from_numpy(np.asarray(index.clips[vids, clips], np.float32))
    att = torch.from_numpy(np.asarray(index.attended[vids, clips], np.float32))
    noise = F.normalize(torch.from_numpy(rng.standard_normal((Q, H)).astype(np.float32)), dim=-1)
    return F.normalize(clip + 0.5 * att + 2.0 * noise, dim=-1)


def overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    return float(np.mean([len(set(x[:k].tolist()) & set(y[:k].tolist())) / k for x, y in zip(a, b)]))


# --------------------------------------------------------------------------- #
# MS-SL's evaluation path (528 spans per video, full matrix), re-implemented
# --------------------------------------------------------------------------- #
class MSSLPath:
    """528 fp32 span embeddings per video, max over them per query, then key-clip guided
    attention computed per (query, video) pair over the video's T frames (W_k, W_v 384x384;
    projections of the frames are done once, which favours the original)."""

    def __init__(self, N: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.clips = torch.empty(N, 528, H)
        self.frames = torch.empty(N, T, H)
        for s in range(0, N, 256):
            e = min(N, s + 256)
            self.clips[s:e] = F.normalize(torch.randn(e - s, 528, H, generator=g), dim=-1)
            self.frames[s:e] = torch.randn(e - s, T, H, generator=g)
        w_k, w_v = torch.randn(H, H, generator=g) * 0.02, torch.randn(H, H, generator=g) * 0.02
        self.keys = self.frames @ w_k                                           # (N, T, H)
        self.values = self.frames @ w_v
        self.mask = torch.ones(N, T, dtype=torch.bool)

    @torch.no_grad()
    def scores(self, q: torch.Tensor, alpha: float = 0.7, chunk: int = 128) -> torch.Tensor:
        q = F.normalize(q, dim=-1)
        out = []
        for s in range(0, self.clips.shape[0], chunk):
            c = self.clips[s:s + chunk]                                        # (v, 528, H)
            sims = torch.matmul(c, q.T)                                        # (v, 528, Q)
            clip_score, key_idx = sims.max(1)                                  # (v, Q)
            key = c.gather(1, key_idx[..., None].expand(-1, -1, H))            # (v, Q, H) key clips
            logits = torch.bmm(key, self.keys[s:s + chunk].transpose(1, 2))    # (v, Q, T) per pair
            logits = logits.masked_fill(~self.mask[s:s + chunk, None, :], float("-inf"))
            att = torch.bmm(logits.softmax(-1), self.values[s:s + chunk])      # (v, Q, H)
            frame_score = (F.normalize(att, dim=-1) * q[None]).sum(-1)         # (v, Q)
            out.append((alpha * clip_score + (1 - alpha) * frame_score).T)
        return torch.cat(out, 1)                                               # (Q, N)


# --------------------------------------------------------------------------- #
def bench_size(N: int, args: argparse.Namespace) -> dict:
    row: dict = {"videos": N, "K": K, "H": H, "threads": torch.get_num_threads(), "corpus": args.corpus,
                 "bytes_per_video_fp32": 2 * K * H * 4 + K * 2 * 4 + 4,
                 "bytes_per_video_fp16": 2 * K * H * 2 + K * 2 * 4 + 4}
    big = N > args.exact_max
    dtype = "float16" if (big or N >= 100_000) else "float32"
    t0 = time.perf_counter()
    index = make_corpus(N, args.seed, dtype, Path(args.workdir) if big else None, kind=args.corpus)
    row.update(dtype=dtype, corpus_seconds=round(time.perf_counter() - t0, 2))
    Q = args.queries
    row["query_batch"] = Q          # the "b50" figures' batch (--queries)
    q = make_queries(index, Q, args.seed + 1)
    n1 = args.batch1
    # exact
    if not big:
        t0 = time.perf_counter()
        exact = ExactSearch(index, precision=args.precision)
        row["exact_init_s"] = round(time.perf_counter() - t0, 2)
        row["exact_precision"] = exact.precision
        gt = exact.search(q, 100)
        row["exact_ms_b50"] = median_ms(lambda: exact.search(q, 10), args.reps) / Q
        row["exact_ms_b1"] = float(np.median([median_ms(lambda i=i: exact.search(q[i:i + 1], 10), 1)
                                              for i in range(n1)]))
        row["exact_qps_b50"] = 1000 / row["exact_ms_b50"]
        row["exact_fallbacks"] = f"{exact.stats['fallbacks']}/{exact.stats['queries']}"
        del exact
    else:
        nq = min(Q, args.gt_queries)
        exact = ExactSearch(index, precision="fp32", video_chunk=8192)
        t0 = time.perf_counter()
        gt = exact.search(q[:nq], 100)
        row["exact_ms_b%d_fp32_stream" % nq] = (time.perf_counter() - t0) * 1e3 / nq
        del exact
        index = make_corpus(N, args.seed, dtype, Path(args.workdir), kind=args.corpus)  # fresh mappings:
        # the ground-truth pass touched every page; the ANN memory below counts only its own
    row["rss_gib_after_exact"] = round(rss_gib(), 2)
    # MS-SL's evaluation path at the exact engine's batch (full matrix vs exact top-10)
    if N <= args.original_max and not big:
        orig = MSSLPath(N, args.seed)
        ms = median_ms(lambda: orig.scores(q), 1) / Q
        row["mssl528_full_matrix_ms_per_query_b50"] = ms
        row["exact_top10_b50_speedup_vs_mssl528_full_matrix_b50"] = ms / row["exact_ms_b50"]
        row["mssl528_fp32_clip_bytes_per_video"] = 528 * H * 4
        del orig
    # ANN
    for kind in args.ann.split(","):
        if kind == "hnsw" and N > args.hnsw_max:
            row[f"{kind}_skipped"] = f"N > --hnsw-max {args.hnsw_max} (build too slow on 2 cores)"
            continue
        if kind == "ivf" and N > args.ivf_max:
            row[f"{kind}_skipped"] = f"N > --ivf-max {args.ivf_max} (scans fp32 lists: slow)"
            continue
        cfg = default_config().search.replace(backend="faiss", index_type=kind, nlist=args.nlist, nprobe=args.nprobe,
                                              ef_search=args.ef_search, candidates=args.candidates,
                                              pq_m=args.pq_m, refine=args.refine,
                                              refine_codes=args.refine_codes)
        fi, row[f"{kind}_build_s"] = build_ann(index, cfg, N, big, args)
        if big:     # serve as a fresh process would: only the pages the searches touch are mapped
            index = make_corpus(N, args.seed, dtype, Path(args.workdir), kind=args.corpus)
        row[f"{kind}_refine"] = "exact from arrays" if args.refine_codes == "arrays" else f"{args.refine_codes} in RAM"
        eng = FaissSearch(index, cfg, faiss_index=fi)
        nq = len(gt.video_idx)
        res = eng.search(q[:nq], 100, candidates=max(100, args.candidates))
        res10 = eng.search(q[:nq], 10)
        row[f"{kind}_overlap10"] = overlap(res10.video_idx, gt.video_idx, 10)
        row[f"{kind}_overlap100"] = overlap(res.video_idx, gt.video_idx, 100)
        row[f"{kind}_ms_b50"] = median_ms(lambda: eng.search(q, 10), args.reps) / Q
        row[f"{kind}_ms_b1"] = float(np.median([median_ms(lambda i=i: eng.search(q[i:i + 1], 10), 1)
                                                for i in range(n1)]))
        row[f"{kind}_rss_gib"] = round(rss_gib(), 2)
        row[f"{kind}_memory_gib"] = memory_gib()
        row[f"{kind}_index_bytes_per_video"] = round(faiss_bytes(fi, args.workdir) / N, 1)
        del eng, fi
    if N <= args.milvus_max:
        row.update(bench_milvus(index, q, gt, args))
    row["load_avg"] = os.getloadavg()[0]
    return row


def build_ann(index: VideoIndex, cfg: SearchConfig, N: int, big: bool, args: argparse.Namespace):
    """(faiss index, build seconds); big corpora cache the index in --workdir (a 1M build
    takes ~15 minutes on 2 cores), reporting the build time of the run that made it."""
    import faiss
    params = ann_params(cfg, N * K, index.alpha)
    tag = "_".join(str(params[k]) for k in ("index_type", "nlist", "pq_m", "refine_codes", "alpha"))
    path = Path(args.workdir) / f"{args.corpus}_{N}_{tag}.faiss"
    if big and path.exists():
        return faiss.read_index(str(path)), json.loads(path.with_suffix(".json").read_text())["build_s"]
    t0 = time.perf_counter()
    fi = train_and_add(index.clips, index.attended, params, progress=big)
    build_s = round(time.perf_counter() - t0, 2)
    if big:
        faiss.write_index(fi, str(path))
        path.with_suffix(".json").write_text(json.dumps({"build_s": build_s, "params": params}))
    return fi, build_s


def bench_milvus(index: VideoIndex, q: torch.Tensor, gt, args: argparse.Namespace) -> dict:
    """Milvus Lite (embedded) behind the same interface: insert time, latency, overlap with exact."""
    import tempfile
    try:
        from prvr.search.milvus import MilvusSearch
    except ImportError as exc:  # pragma: no cover - pymilvus is in the lock
        return {"milvus_skipped": str(exc)}
    nq = min(args.milvus_queries, len(gt.video_idx))
    with tempfile.TemporaryDirectory(prefix="prvr-milvus-") as tmp:
        cfg = default_config().search.replace(backend="milvus", milvus_uri=str(Path(tmp) / "bench.db"),
                                              milvus_candidates=args.milvus_candidates)
        t0 = time.perf_counter()
        eng = MilvusSearch(index, cfg)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = eng.search(q[:nq], 10)
        ms = (time.perf_counter() - t0) * 1e3 / nq
        eng.client.close()
    return {"milvus_build_s": round(build, 2), "milvus_ms_per_query": ms, "milvus_queries": nq,
            "milvus_overlap10": overlap(res.video_idx, gt.video_idx[:nq], 10)}


def print_table(rows: list[dict]) -> None:
    keys = sorted({k for r in rows for k in r if k not in ("videos",)})
    print(f"{'metric':<36}" + "".join(f"{r['videos']:>14,}" for r in rows))
    for k in keys:
        vals = []
        for r in rows:
            v = r.get(k, "")
            vals.append(f"{v:>14.3f}" if isinstance(v, float) else f"{str(v)[:13]:>14}")
        print(f"{k:<36}" + "".join(vals))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="2179,10000,100000", help="corpus sizes (videos), comma-separated")
    p.add_argument("--quick", action="store_true", help="sizes 2179,10000, fewer queries and reps")
    p.add_argument("--queries", type=int, default=50, help="query batch size (batch-50 timing)")
    p.add_argument("--batch1", type=int, default=10, help="queries timed one at a time")
    p.add_argument("--reps", type=int, default=5, help="repetitions of the batch timing (median)")
    p.add_argument("--ann", default="ivfpqfs,ivf,hnsw", help="faiss index types to build")
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=128)
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--pq-m", type=int, default=96)
    p.add_argument("--refine", type=int, default=2000, help="ANN clip hits re-scored exactly per query")
    p.add_argument("--refine-codes", default="arrays",
                   help="what re-scores the ANN hits: arrays (exactly, from the stored arrays), or a copy "
                        "of z in RAM: fp16, sq8, pq<M> (8-bit PQ, M bytes per clip)")
    p.add_argument("--candidates", type=int, default=50, help="videos re-ranked exactly after ANN")
    p.add_argument("--milvus-candidates", type=int, default=200, help="videos by best clip (Milvus)")
    p.add_argument("--ivf-max", type=int, default=10000, help="skip IVF-Flat above this size")
    p.add_argument("--corpus", default="structured", choices=("structured", "isotropic"),
                   help="similarity structure of the random corpus (see the module docstring)")
    p.add_argument("--hnsw-max", type=int, default=10000, help="skip HNSW above this size")
    p.add_argument("--exact-max", type=int, default=200000,
                   help="above: memmapped corpus in --workdir, exact ground truth fp32 on --gt-queries")
    p.add_argument("--gt-queries", type=int, default=5)
    p.add_argument("--milvus-max", type=int, default=2179, help="run Milvus Lite up to this size")
    p.add_argument("--milvus-queries", type=int, default=5)
    p.add_argument("--original-max", type=int, default=2179,
                   help="run the re-implemented MS-SL evaluation path (528 spans per video) up to this size")
    p.add_argument("--precision", default="int8", choices=("int8", "bf16", "fp32"),
                   help="ExactSearch's screen (search.screen)")
    p.add_argument("--threads", type=int, default=None, help="torch/faiss threads (default: all)")
    p.add_argument("--workdir", default="/tmp/prvr_search_bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.queries, args.reps, args.batch1 = "2179,10000", 50, 3, 5
    if args.threads:
        torch.set_num_threads(args.threads)
        import faiss
        faiss.omp_set_num_threads(args.threads)
    rows = []
    for N in (int(s) for s in args.sizes.split(",")):
        rows.append(bench_size(N, args))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print_table(rows)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
