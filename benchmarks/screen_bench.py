"""Why a worker scores slower than a loop: the exact engine's single-query search with the int8
rows in the cache and with them evicted.

The fused screen reads one int8 row of every clip in the corpus per query (N x K x H bytes).
Queries that follow each other (a benchmark loop) find those rows in the cache; a worker's
requests come a few milliseconds apart, and on a shared machine the rest of the host evicts
them meanwhile. Each query is timed in three conditions, taken in turn: right after the
previous query (`warm`), after `--gap-ms` of sleep (`after idle`), and after as long a busy
wait that touches no memory (`after spinning`: if it is as slow as after idle, the cost is
the evicted cache, not an idle core waking up). Per screen thread count
(search.screen_threads): the fused pass alone (`FusedScreen.bounds` over the whole index)
and the whole search (`ExactSearch.search`, top-10, certified).

    python benchmarks/screen_bench.py --name screen-cache
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402
import search_bench  # noqa: E402

CONDITIONS = ("warm", "after idle", "after spinning")


def _before(condition: str, gap_s: float) -> None:
    if condition == "after idle":
        time.sleep(gap_s)
    elif condition == "after spinning":
        end = time.perf_counter() + gap_s
        while time.perf_counter() < end:
            pass


def measure(videos: int, queries: int, gap_ms: float, threads: list[int]) -> dict:
    from prvr.search import ExactSearch, VideoIndex
    from prvr.search.exact import as_queries

    torch.set_num_threads(1)
    vec = search_bench.make_corpus(videos, 1, "float32", None, kind="structured")
    index = VideoIndex.from_arrays(np.asarray(vec.clips), np.asarray(vec.attended), alpha=0.7)
    q = search_bench.make_queries(index, queries, 2)
    engines = {t: ExactSearch(index, threads=t) for t in threads}
    ms: dict[str, list[float]] = {}
    for i in range(queries):
        one = as_queries(q[i:i + 1])
        for t, eng in engines.items():
            state = eng._fused.prepare(one)
            for what, call in (("pass", lambda: eng._fused.bounds(state, 0, eng.N)),
                               ("search", lambda: eng.search(one, 10))):
                for condition in CONDITIONS:
                    call() if condition == "warm" else _before(condition, gap_ms / 1e3)
                    start = time.perf_counter()
                    call()
                    ms.setdefault(f"{t}|{what}|{condition}", []).append(1e3 * (time.perf_counter() - start))
    N, K, H = index.clips.shape
    return {"videos": N, "K": K, "H": H, "int8_mb_per_query": N * K * H / 1e6, "queries": queries,
            "gap_ms": gap_ms, "threads": threads,
            "p50_ms": {key: statistics.median(v) for key, v in ms.items()},
            "fused_misses": {t: eng.stats["fused_misses"] for t, eng in engines.items()}}


def markdown(r: dict) -> str:
    head = ["screen threads", "measured"] + [f"{c}, p50 ms" for c in CONDITIONS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in r["threads"]:
        for what, label in (("pass", "fused int8 pass"), ("search", "whole search, top-10")):
            cells = [f"{r['p50_ms'][f'{t}|{what}|{c}']:.2f}" for c in CONDITIONS]
            lines.append(f"| {t} | {label} | " + " | ".join(cells) + " |")
    lines += ["", f"{r['videos']:,} videos x {r['K']} clips x {r['H']} (search_bench's structured corpus): "
              f"the pass reads {r['int8_mb_per_query']:.1f} MB of int8 rows per query. {r['queries']} single "
              f"queries, each timed in the three conditions in turn; `after idle` / `after spinning`: "
              f"{r['gap_ms']:g} ms of sleep / busy wait (no memory traffic) before it. One torch thread."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=2179, help="corpus size (default: TVR test, 2179)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--gap-ms", type=float, default=10.0, help="sleep or busy wait before a timed call")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="search.screen_threads values")
    p.add_argument("--name", default=None, help="write results/NAME.json (benchmarks/results.py)")
    args = p.parse_args(argv)
    if args.videos < 1 or args.queries < 1 or args.gap_ms < 0 or min(args.threads) < 1:
        p.error("--videos, --queries and --threads must be positive and --gap-ms not negative")
    started = results.meta(argv)
    r = measure(args.videos, args.queries, args.gap_ms, args.threads)
    print(markdown(r))
    if args.name:
        print(results.write(args.name, r, markdown(r), argv, started=started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
