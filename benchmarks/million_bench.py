"""A million videos on one machine: the recall-latency-memory curve of the faiss engine.

The corpus is `search_bench.py`'s structured random one (K=32 clips and K attended vectors of
H=384 per video), written once as memory-mapped fp16 arrays into --workdir (49 GB at 1M videos:
more than RAM, as in production). For each re-score code in --codes it builds (or reuses from
--workdir) the faiss index with prvr's own code path and serves it with `FaissSearch`: IVF-PQ
fast scan -> the `refine` hits re-scored from the in-RAM codes -> the `candidates` best videos
re-ranked exactly from the memory-mapped arrays. It sweeps nprobe x refine x candidates and
reports per setting:

- top-10 overlap with the exact engine (fp32, streamed) on --gt-queries queries, and where the
  rest is lost: the share of the true top-10 videos with a clip among the `refine` hits (the IVF
  probe) and among the candidates (the re-score codes), with the codes' error on q.z;
- ms per query at batch 1, wall and CPU (the thread's own time: near what an idle core takes; on
  a shared machine the wall time includes waiting for a core), with the corpus pages dropped
  from the page cache before each query (`cold`: the disk reads of a corpus larger than RAM;
  the share still cached afterwards is reported) and warm, also without `search.read_ahead`
  (--read-ahead-off); the CPU ms of each step (scan, re-score, picking, re-rank); batch 50 warm;
- memory: what must stay in RAM, resident = private bytes (the fast-scan index, Python) + the
  resident pages of the re-score codes (memory-mapped from the cached index file and read in
  once); the mapped corpus pages (page cache: reclaimable, counted in time, not in memory); the
  faiss bytes per video, with the resident memory projected to 1M videos when the corpus is smaller.

Results go through `benchmarks/results.py` (`--name`: results/NAME.json):

    PYTHONPATH=. python benchmarks/million_bench.py --videos 100000 --codes arrays,sq4,pq96,rabitq3 \
        --read-ahead-off --name search-100k
    PYTHONPATH=. python benchmarks/million_bench.py --videos 1000000 --workdir /data/bench1m \
        --nlist 4096 --nprobe 256,512 --refine 10000,20000 --candidates 50,100 --codes sq4,rabitq3 \
        --gt-queries 50 --batch1 30 --read-ahead-off --name million
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import itertools
import json
import mmap
import os
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402 - results/NAME.json and its README block
from search_bench import K, make_corpus, make_queries, memory_gib, overlap  # noqa: E402 - the shared corpus
from prvr.config import default_config  # noqa: E402
from prvr.search.ann import (FaissSearch, ann_params, best_videos, distinct_videos, fused_rows,  # noqa: E402
                             read_faiss, rerank, train_and_add)
from prvr.search.exact import ExactSearch  # noqa: E402
from prvr.search.index import VideoIndex  # noqa: E402

GIB = 2 ** 30


# --------------------------------------------------------------------------- page cache
def _files(index: VideoIndex) -> list[tuple[Any, str]]:
    """(mmap, file name) of the corpus arrays."""
    return [(arr._mmap, arr.filename) for arr in (index.clips, index.attended)]


def drop_pages(index: VideoIndex) -> None:
    """Drop the corpus files from this process's mappings and from the page cache (their clean
    pages only: nothing else on the machine is touched), as if the corpus had never been read."""
    for mm, name in _files(index):
        mm.madvise(mmap.MADV_DONTNEED)
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fdatasync(fd)                     # a page not yet written back cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def resident_pages(addr: int, length: int) -> int:
    """Pages of the mapped range addr..addr+length in RAM (mincore; addr need not be aligned)."""
    start = addr - addr % mmap.PAGESIZE
    length += addr - start
    vec = np.zeros((length + mmap.PAGESIZE - 1) // mmap.PAGESIZE, np.uint8)
    if _libc().mincore(ctypes.c_void_p(start), length, vec.ctypes.data_as(ctypes.c_void_p)) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return int((vec & 1).sum())


def cached_share(index: VideoIndex) -> float:
    """Share of the corpus files' pages in the page cache (mincore over a fresh mapping)."""
    libc = _libc()
    cached = total = 0
    for _, name in _files(index):
        size = os.path.getsize(name)
        fd = os.open(name, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            try:
                cached += resident_pages(addr, size)
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
        total += (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    return cached / total


# --------------------------------------------------------------------------- corpus, truth, index
def ground_truth(index: VideoIndex, q: torch.Tensor, workdir: Path, tag: str) -> tuple[np.ndarray, float]:
    """The exact top-100 of each query (fp32, streamed over the memory-mapped corpus), cached."""
    path = workdir / f"truth_{tag}.npy"
    if path.exists():
        return np.load(path), json.loads(path.with_suffix(".json").read_text())["ms_per_query"]
    t0 = time.perf_counter()
    gt = ExactSearch(index, precision="fp32", video_chunk=8192).search(q, 100).video_idx.numpy()
    ms = (time.perf_counter() - t0) * 1e3 / len(q)
    np.save(path, gt)
    path.with_suffix(".json").write_text(json.dumps({"ms_per_query": ms}))
    return gt, ms


def fast_scan(index: VideoIndex, cfg: Any, workdir: Path, corpus_tag: str) -> tuple[Path, float]:
    """(the file of the IVF-PQ fast-scan index without re-score codes, build seconds): built with
    prvr's code path (`train_and_add`), cached in `workdir` (at 1M videos, nlist 4096: hours on one
    core). Not loaded here: reading a faiss file briefly takes twice its size in RAM, so only the
    index that is used is read."""
    params = ann_params(cfg.replace(refine_codes="arrays"), index.count * K, index.alpha)
    tag = "_".join(str(params[k]) for k in ("index_type", "nlist", "pq_m", "alpha"))
    path = workdir / f"{corpus_tag}_{tag}.faiss"
    if not path.exists():
        t0 = time.perf_counter()
        built = train_and_add(index.clips, index.attended, params, progress=True)
        tmp = path.with_suffix(".tmp")
        faiss.write_index(built, str(tmp))
        os.replace(tmp, path)
        path.with_suffix(".json").write_text(json.dumps({"build_s": round(time.perf_counter() - t0, 1),
                                                         "params": params}))
        del built
    return path, json.loads(path.with_suffix(".json").read_text())["build_s"]


def with_codes(index: VideoIndex, cfg: Any, fast: Path, stem: Path) -> tuple[Any, float]:
    """(the fast-scan index in file `fast` with `cfg`'s re-score codes, their build seconds): built by
    the engine (prvr's path for a config asking for other codes than the file's), cached as
    `stem`.faiss."""
    path = stem.with_suffix(".faiss")
    if not path.exists():
        t0 = time.perf_counter()
        built = FaissSearch(index, cfg, faiss_index=faiss.read_index(str(fast))).faiss
        faiss.write_index(built, str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)
        path.with_suffix(".json").write_text(json.dumps({"build_s": round(time.perf_counter() - t0, 1)}))
        drop_pages(index)                         # the build read every row: start the sweep cold
        return built, json.loads(path.with_suffix(".json").read_text())["build_s"]
    return read_mapped(path), json.loads(path.with_suffix(".json").read_text())["build_s"]


def read_mapped(path: Path) -> Any:
    """A stored index with its flat re-score codes memory-mapped (IO_FLAG_MMAP_IFC), then read in
    once so they are resident. Read into RAM instead, faiss peaked at over 20 GB for the 7.9 GB sq4
    file at 1M videos. Their resident pages count in `resident_gib` (`mapped_codes_gib`)."""
    fi = read_faiss(path, mapped=True)                    # prvr's loader above MAP_ABOVE_BYTES
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, 1 << 24):              # page cache; the mapping then faults them in
            pass
    finally:
        os.close(fd)
    return fi


def mapped_codes_gib(fi: Any) -> float:
    """Resident bytes (GiB) of the re-score codes when they are memory-mapped (mincore over their
    own address range: the rest of the mapped file, read once at load, is not counted); 0 when
    faiss holds them in its own memory (then they are private memory)."""
    if not isinstance(fi, faiss.IndexRefine):
        return 0.0
    codes = faiss.downcast_index(fi.refine_index).codes
    if codes.is_owned or codes.size() == 0:
        return 0.0
    addr = faiss.rev_swig_ptr(codes.data(), codes.size()).ctypes.data
    return round(min(resident_pages(addr, codes.size()) * mmap.PAGESIZE, codes.size()) / GIB, 2)


def faiss_bytes(fi: Any) -> int:
    """Bytes of a faiss index as stored (what it holds in RAM, up to small headers)."""
    return int(faiss.serialize_index(fi).nbytes)


# --------------------------------------------------------------------------- timing
def time_batch1(eng: FaissSearch, q: torch.Tensor, index: VideoIndex, cold: bool) -> dict[str, float]:
    """Median wall and CPU ms of single queries; `cold` drops the corpus pages before each, warm
    runs them all once first (their rows cached and mapped)."""
    wall, cpu = [], []
    for i in range(1 if cold else len(q)):
        eng.search(q[i:i + 1], 10)
    for i in range(len(q)):
        if cold:
            drop_pages(index)
        t0, c0 = time.perf_counter(), time.thread_time()
        eng.search(q[i:i + 1], 10)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return {"wall": round(float(np.median(wall)) * 1e3, 2), "cpu": round(float(np.median(cpu)) * 1e3, 2)}


def time_batch(eng: FaissSearch, q: torch.Tensor, reps: int = 3) -> float:
    eng.search(q, 10)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        eng.search(q, 10)
        ts.append(time.perf_counter() - t0)
    return round(float(np.median(ts)) * 1e3 / len(q), 2)


def private_gib() -> float:
    return memory_gib().get("RssAnon", float("nan"))


# --------------------------------------------------------------------------- where recall is lost
def _share(gt: np.ndarray, found: list) -> float:
    return round(float(np.mean([len(set(g.tolist()) & set(f)) / len(g) for g, f in zip(gt, found)])), 4)


ERROR_HITS = 1000      # hits per query whose codes error is measured (memory stays bounded at any refine)


def codes_error(eng: FaissSearch, qn: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> float:
    """Std of the re-score codes' q.z against the exact q.z of the same hits (Q, n)."""
    rows = labels.reshape(-1)
    order = np.argsort(rows)
    fc = eng.index.clips.reshape(-1, eng.index.dim)
    fa = eng.index.attended.reshape(-1, eng.index.dim)
    z = np.empty((len(rows), eng.index.dim), np.float32)
    z[order] = fused_rows(fc[rows[order]], fa[rows[order]], eng.index.alpha, 0, len(rows))
    exact = np.einsum("qh,qnh->qn", qn, z.reshape(len(qn), -1, eng.index.dim))
    return float(np.std(scores - exact))


def stage_recall(eng: FaissSearch, q: torch.Tensor, gt: np.ndarray) -> dict[str, float]:
    """Share of the true top-10 videos with a clip among the engine's `refine` hits (what the IVF
    probe and the fast scan let through) and among its candidates (what the re-score keeps), and
    the re-score codes' error on q.z of the hits (std against the exact value, the first
    ERROR_HITS hits of 20 queries)."""
    K, cfg, qn = eng.K, eng.cfg, np.ascontiguousarray(q.numpy())
    need = min(eng.N, max(10, cfg.candidates))
    scores, labels = eng.faiss.search(qn, min(eng.N * K, max(cfg.refine, 2 * need)))
    if eng.params["refine_codes"] == "arrays":
        cands, err = best_videos(eng.index, q, labels, need, eng.index.alpha), 0.0
    else:
        cands = distinct_videos(labels, K, need)
        err = codes_error(eng, qn[:20], scores[:20, :ERROR_HITS], labels[:20, :ERROR_HITS])
    return {"hit_recall10": _share(gt, [(row[row >= 0] // K).tolist() for row in labels]),
            "candidate_recall10": _share(gt, [c.tolist() for c in cands]), "codes_error_std": round(err, 5)}


def stage_cpu(eng: FaissSearch, q: torch.Tensor) -> dict[str, float]:
    """Median CPU ms per single query (warm) of each step: the fast scan alone, the re-score of its
    hits (for `arrays`, with picking the candidates), picking them, the exact re-rank."""
    K, cfg, alpha = eng.K, eng.cfg, eng.index.alpha
    need = min(eng.N, max(10, cfg.candidates))
    n, qn = min(eng.N * K, max(cfg.refine, 2 * need)), np.ascontiguousarray(q.numpy())
    refined = isinstance(eng.faiss, faiss.IndexRefine)
    base = faiss.downcast_index(eng.faiss.base_index) if refined else eng.faiss
    labels = eng.faiss.search(qn, n)[1]

    def med(fn) -> float:
        ts = []
        for i in range(len(qn)):
            fn(i)                                                   # warm
            c0 = time.thread_time()
            fn(i)
            ts.append(time.thread_time() - c0)
        return round(float(np.median(ts)) * 1e3, 2)

    scan = med(lambda i: base.search(qn[i:i + 1], n))
    if refined:
        rescore = round(med(lambda i: eng.faiss.search(qn[i:i + 1], n)) - scan, 2)
        pick = med(lambda i: distinct_videos(labels[i:i + 1], K, need))
        cands = distinct_videos(labels, K, need)
    else:
        rescore = pick = med(lambda i: best_videos(eng.index, q[i:i + 1], labels[i:i + 1], need, alpha))
        cands = best_videos(eng.index, q, labels, need, alpha)
    return {"cpu_ms_fast_scan": scan, "cpu_ms_rescore": rescore, "cpu_ms_pick": pick,
            "cpu_ms_rerank": med(lambda i: rerank(eng.index, q[i:i + 1], cands[i:i + 1], 10, alpha, True))}


# --------------------------------------------------------------------------- the sweep
def sweep(index: VideoIndex, codes: str, q: torch.Tensor, gt: np.ndarray, args: argparse.Namespace,
          corpus_tag: str) -> list[dict[str, Any]]:
    """Every nprobe x refine x candidates setting of one re-score code: the engine builds the codes
    in memory over the cached fast-scan index (prvr's path for a config asking for other codes)."""
    base = default_config().search.replace(backend="faiss", index_type="ivfpqfs", nlist=args.nlist,
                                           pq_m=args.pq_m, refine_codes=codes)
    before = private_gib()
    fast, build_s = fast_scan(index, base, Path(args.workdir), corpus_tag)
    drop_pages(index)                                       # the build may have read every row
    index = make_corpus(args.videos, args.seed, "float16", Path(args.workdir))    # fresh mappings
    fi, codes_s = with_codes(index, base, fast, Path(args.workdir) / f"{corpus_tag}_{args.nlist}_{args.pq_m}_{codes}")
    nbytes = faiss_bytes(fi)
    rows = []
    for nprobe, refine, cands in itertools.product(args.nprobe, args.refine, args.candidates):
        cfg = base.replace(nprobe=nprobe, refine=refine, candidates=cands, read_ahead=True)
        eng = FaissSearch(index, cfg, faiss_index=fi)
        res = eng.search(q[:len(gt)], 10)
        timed = q[-args.batch1:]                              # not among the overlap queries' warm-up
        cold = time_batch1(eng, timed, index, cold=True)
        share = cached_share(index)
        warm = time_batch1(eng, timed, index, cold=False)
        steps = stage_cpu(eng, timed)
        row = {"codes": codes, "nprobe": nprobe, "refine": refine, "candidates": cands,
               "overlap10": round(overlap(res.video_idx, torch.from_numpy(gt), 10), 4),
               **stage_recall(eng, q[:len(gt)], gt),
               "ms_b1_cold": cold["wall"], "cpu_ms_b1_cold": cold["cpu"], "cached_share_after_cold": round(share, 4),
               "ms_b1_warm": warm["wall"], "cpu_ms_b1_warm": warm["cpu"], **steps,
               "ms_b50_warm": time_batch(eng, q[:50]),
               "fast_scan_build_s": build_s, "codes_build_s": codes_s,
               "faiss_bytes_per_video": round(nbytes / args.videos, 1), "private_gib": private_gib(),
               "mapped_gib": mapped_codes_gib(fi),
               "engine_private_gib": round(private_gib() - before, 2), "memory_gib": memory_gib(),
               "load_avg": round(os.getloadavg()[0], 2)}
        if args.read_ahead_off:
            plain = FaissSearch(index, cfg.replace(read_ahead=False), faiss_index=fi)
            row.update({f"{k}_no_read_ahead": v for k, v in
                        (("ms_b1_cold", time_batch1(plain, timed, index, cold=True)["wall"]),
                         ("ms_b1_warm", time_batch1(plain, timed, index, cold=False)["wall"]))})
        row["resident_gib"] = round(row["private_gib"] + row["mapped_gib"], 2)
        row["resident_gib_at_1m"] = round(row["resident_gib"] + nbytes * (1e6 / args.videos - 1) / GIB, 2)
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, gt_ms: float) -> str:
    head = ("| codes | nprobe | refine | candidates | top-10 overlap | in hits / in candidates | "
            "batch 1 cold, wall / CPU ms | cold without read-ahead, wall ms | batch 1 warm, wall / CPU ms | "
            "batch 50 warm, ms/query | resident GiB (private + mapped codes) | at 1M, GiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['codes']} | {r['nprobe']} | {r['refine']} | {r['candidates']} | {r['overlap10']:.3f} | "
                   f"{r['hit_recall10']:.3f} / {r['candidate_recall10']:.3f} | "
                   f"{r['ms_b1_cold']} / {r['cpu_ms_b1_cold']} | {r.get('ms_b1_cold_no_read_ahead', '')} | "
                   f"{r['ms_b1_warm']} / {r['cpu_ms_b1_warm']} | {r['ms_b50_warm']} | "
                   f"{r['resident_gib']:.2f} ({r['private_gib']:.2f} + {r['mapped_gib']:.2f}) | "
                   f"{r['resident_gib_at_1m']:.2f} |\n" for r in rows)
    errors = ", ".join(f"{c} {e}" for c, e in dict((r["codes"], r["codes_error_std"]) for r in rows).items())
    return (f"{args.videos:,} videos (structured random corpus, fp16 arrays memory-mapped), nlist "
            f"{args.nlist}, fast scan {args.pq_m // 2} bytes per clip, {args.gt_queries} queries against the "
            f"exact engine ({gt_ms:.0f} ms per query streamed), {args.batch1} others timed one at a time, "
            f"{args.threads} thread(s). `in hits / in candidates`: share of the true top-10 videos with a "
            f"clip among the `refine` hits / among the candidates. CPU ms = the thread's own time (an idle "
            f"core); wall ms on a shared machine include waiting for it. `cold` drops the corpus pages "
            f"before each query; resident = private memory + the resident pages of the memory-mapped "
            f"re-score codes (read in once at load); `at 1M` = that with the faiss bytes per video times 1M. "
            f"Error of the re-score codes on q.z (std): {errors}.\n\n" + head + body)


def main(argv: list[str] | None = None) -> int:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=100_000)
    p.add_argument("--codes", default="arrays,sq4,pq96,rabitq3", help="search.refine_codes to compare, comma-separated")
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--pq-m", type=int, default=96, help="fast-scan sub-quantisers (4 bits each)")
    p.add_argument("--nprobe", type=ints, default=[64, 128])
    p.add_argument("--refine", type=ints, default=[2000])
    p.add_argument("--candidates", type=ints, default=[30, 50, 100])
    p.add_argument("--gt-queries", type=int, default=200, help="queries whose top-10 is compared with exact")
    p.add_argument("--batch1", type=int, default=30, help="queries timed one at a time")
    p.add_argument("--threads", type=int, default=1, help="torch and faiss threads")
    p.add_argument("--read-ahead-off", action="store_true",
                   help="also time cold single queries without reading the candidates' rows ahead")
    p.add_argument("--workdir", default="/tmp/prvr_million")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="write results/NAME.json through benchmarks/results.py")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    workdir, started = Path(args.workdir), results.meta(argv)   # the commit that ran, not one made meanwhile
    t0 = time.perf_counter()
    index = make_corpus(args.videos, args.seed, "float16", workdir)
    corpus_s = round(time.perf_counter() - t0, 1)
    q = make_queries(index, args.gt_queries + max(args.batch1, 50), args.seed + 1)
    corpus_tag = f"structured_{args.videos}_{args.seed}"
    gt, gt_ms = ground_truth(index, q[:args.gt_queries], workdir, f"{corpus_tag}_{args.gt_queries}_of_{len(q)}")
    drop_pages(index)            # unmapped here too: a page mapped anywhere stays in the page cache
    figures = {"videos": args.videos, "K": K, "H": index.dim, "nlist": args.nlist, "pq_m": args.pq_m,
               "gt_queries": args.gt_queries, "batch1_queries": args.batch1, "threads": args.threads,
               "corpus_seconds": corpus_s, "exact_ms_per_query_fp32_stream": round(gt_ms, 1), "rows": []}
    for codes in args.codes.split(","):
        figures["rows"] += sweep(index, codes, q, gt[:, :10], args, corpus_tag)
        md = markdown(figures["rows"], args, gt_ms)
        if args.name:                                    # after each code: a long run keeps what it measured
            print(results.write(args.name, figures, md, argv, started=started), file=sys.stderr)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
