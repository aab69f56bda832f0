"""Peak memory and time of evaluation (`prvr.evaluate.rank_split`) on a large corpus.

Each configuration runs in its own subprocess so its peak RSS is its own. The
corpus is random (K clip + K attended vectors of H=384 per video; memory and time
depend on sizes, not values); queries are 5 per video as in TVR. Beside it, the
memory the original evaluation path needs for the same corpus (528 fp32 span
embeddings per video, kept for the whole corpus), computed from its array sizes.

    python benchmarks/eval_bench.py --videos 10000 --out runs/bench/eval.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

H = 384

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from prvr.evaluate import rank_split
from prvr.model import VideoEmbeddings
V, K, Q, qc, vc = (int(x) for x in sys.argv[1:6])
g = torch.Generator().manual_seed(0)
emb = VideoEmbeddings(torch.randn(V, K, 384, generator=g), torch.zeros(V, K, 2, dtype=torch.long),
                      torch.randn(V, K, 384, generator=g))
queries = torch.randn(Q, 384, generator=g)
truth = np.arange(Q) % V
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
ranks = rank_split(queries, emb, truth, 0.7, query_chunk=qc, video_chunk=vc)
elapsed = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"videos": V, "clips_per_video": K, "queries": Q, "query_chunk": qc, "video_chunk": vc,
                  "seconds": elapsed, "queries_per_s": Q / elapsed,
                  "corpus_mib": 2 * V * K * 384 * 4 / 2**20,
                  "peak_rss_mib": peak / 1024, "rss_growth_during_ranking_mib": (peak - base) / 1024}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--videos", type=int, default=10000)
    p.add_argument("--queries-per-video", type=int, default=5)
    p.add_argument("--query-chunk", type=int, default=2048)
    p.add_argument("--video-chunk", type=int, default=4096)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    V = args.videos
    rows = []
    # ms-sl++ (32 medoid clips) on the full corpus; ms-sl (all 528 spans, through the same code)
    # on a TVR-test-sized one: its corpus alone is 16 GB at 10,000 videos.
    for K, n in ((32, V), (528, min(V, 2179))):
        res = subprocess.run([sys.executable, "-c", CHILD, str(n), str(K), str(n * args.queries_per_video),
                              str(args.query_chunk), str(args.video_chunk)], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    original = {"videos": V, "clip_store_mib": V * 528 * H * 4 / 2**20,
                "score_tensor_mib_per_query_batch_of_100": V * 528 * 100 * 4 / 2**20}
    print(f"evaluation: every query against every video, {args.queries_per_video} queries per video")
    print(f"{'videos':>8}{'clips/video':>12}{'corpus MiB':>12}{'peak RSS MiB':>14}{'growth MiB':>12}{'seconds':>9}{'queries/s':>11}")
    for r in rows:
        print(f"{r['videos']:>8}{r['clips_per_video']:>12}{r['corpus_mib']:>12.0f}{r['peak_rss_mib']:>14.0f}"
              f"{r['rss_growth_during_ranking_mib']:>12.0f}{r['seconds']:>9.1f}{r['queries_per_s']:>11.0f}")
    print(f"original path, same corpus: {original['clip_store_mib']:.0f} MiB of span embeddings alone, "
          f"+ {original['score_tensor_mib_per_query_batch_of_100']:.0f} MiB per (videos x 528 x 100 queries) "
          "score tensor")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"runs": rows, "original": original}, indent=2))


if __name__ == "__main__":
    main()
