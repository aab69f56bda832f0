"""Text-encoder benchmark: one typed sentence through the MiniLM at each runtime and precision,
and what int8 weights do to the features and to a trained model's ranking.

Latency: `TextEncoder.encode([sentence])` as the server calls it (tokenizer included), p50 /
p90 over `--calls` calls after a warm-up, per thread count. The configurations take turns
call by call, so a busy machine slows them alike. Configurations: torch fp32 and bf16 (the
LeanBert path), ONNX Runtime fp32 and int8 (`text.runtime onnx`, `text.quantize`).

Quality (with `--checkpoint` and `--data`): every caption of the split encoded by each
configuration, as token features (cosine and max abs difference to torch fp32, per token)
and through the model as queries against the split's videos: the top-10 overlap with the
fp32 ranking, the top-1 agreement and R@1/5/10/100 and SumR of each.

    python benchmarks/text_bench.py                          # latency, results/text_bench.json
    python benchmarks/text_bench.py --checkpoint runs/train/model.pt --data data/synth --split test
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402

SENTENCE = "a woman opens the fridge in the kitchen and smiles"       # 12 tokens with CLS and SEP
CONFIGS = {"torch fp32": ("torch", "float32", "none"), "torch bf16": ("torch", "bfloat16", "none"),
           "onnx fp32": ("onnx", "float32", "none"), "onnx int8": ("onnx", "float32", "int8")}


def encoders(names: list[str], cache: str, max_tokens: int = 30) -> dict[str, Any]:
    """One TextEncoder per configuration; ONNX sessions take torch's current thread count."""
    from prvr.text import TextEncoder

    return {n: TextEncoder("minilm", max_tokens, CONFIGS[n][1], runtime=CONFIGS[n][0],
                           quantize=CONFIGS[n][2], onnx_cache=cache) for n in names}


def latency(names: list[str], threads: int, calls: int, warmup: int, sentence: str, cache: str) -> dict[str, Any]:
    torch.set_num_threads(threads)
    encs = encoders(names, cache)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + calls):
        for n, enc in encs.items():                   # turn by turn: noise hits every configuration
            t, c = time.perf_counter(), time.process_time()
            enc.encode([sentence])
            if i >= warmup:
                times[n].append(1e3 * (time.perf_counter() - t))
                cpu[n].append(1e3 * (time.process_time() - c))
    tokens = len(encs[names[0]].tokenizer(sentence)["input_ids"])
    # cpu_p50_ms: CPU time of all the process's threads per call; on a busy machine it is what a
    # 1-thread call would take alone (waiting for a core is not counted), a wall time is not
    return {n: {"p50_ms": statistics.median(v), "p90_ms": float(np.percentile(v, 90)), "min_ms": min(v),
                "cpu_p50_ms": statistics.median(cpu[n]), "calls": len(v), "tokens": tokens}
            for n, v in times.items()}


def quality(names: list[str], checkpoint: str, data: str, split: str, cache: str) -> dict[str, Any]:
    """Token features and the model's top-10 of every configuration against torch fp32."""
    from prvr.collection import Collection
    from prvr.encoding import VideoSource, encode_corpus, encode_token_features, load_model
    from prvr.metrics import metrics_from_ranks
    from prvr.search import ExactSearch, VideoIndex

    model, cfg, _ = load_model(checkpoint)
    coll = Collection(data, cfg.data.video_feature)
    caps, vids = coll.captions(split), coll.videos(split)
    emb, _ = encode_corpus(model, VideoSource(coll, cfg, vids), vids, torch.device("cpu"))
    engine = ExactSearch(VideoIndex.from_arrays(emb.clips.numpy(), emb.attended.numpy(), alpha=cfg.model.alpha),
                         precision="fp32")
    truth = np.array([vids.index(c.video_id) for c in caps])
    feats = {n: e.encode([c.text for c in caps]) for n, e in encoders(names, cache, cfg.model.max_desc_len).items()}
    ref = "torch fp32"
    top = {n: engine.search(encode_token_features(model, f), top_k=10).video_idx.numpy() for n, f in feats.items()}
    out = {}
    for n, f in feats.items():
        a, b = np.concatenate(feats[ref]), np.concatenate(f)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        ranks = engine.truth_ranks(encode_token_features(model, f), truth)["fused"]
        m = metrics_from_ranks(ranks)
        out[n] = {"token_cosine_mean": float(cos.mean()), "token_cosine_min": float(cos.min()),
                  "max_abs_diff": float(np.abs(a - b).max()),
                  "top10_overlap": float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(top[ref], top[n])])),
                  "top1_agree": float((top[ref][:, 0] == top[n][:, 0]).mean()),
                  **{k: m[k] for k in ("r1", "r5", "r10", "r100", "sumr")}}
    return {"checkpoint": checkpoint, "split": split, "queries": len(caps), "videos": len(vids), "configs": out}


def markdown(figures: dict[str, Any]) -> str:
    lat = figures["latency"]
    names = list(next(iter(lat.values())))
    lines = ["| text encoder (one sentence, %d tokens) | %s |" % (
        next(iter(next(iter(lat.values())).values()))["tokens"],
        " | ".join(f"{t} thread{'s' * (t != '1')}: p50 / p90 (CPU p50) ms" for t in lat)),
        "|---|" + "---|" * len(lat)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{lat[t][n]['p50_ms']:.2f} / {lat[t][n]['p90_ms']:.2f} "
                                              f"({lat[t][n]['cpu_p50_ms']:.2f})" for t in lat) + " |")
    q = figures.get("quality")
    if q:
        lines += ["", f"Against torch fp32 on {q['queries']} {q['split']} queries x {q['videos']} videos "
                  f"(`{q['checkpoint']}`):", "",
                  "| text encoder | token cosine mean / min | max abs diff | top-10 overlap | top-1 agree | SumR |",
                  "|---|---|---|---|---|---|"]
        for n, v in q["configs"].items():
            lines.append(f"| {n} | {v['token_cosine_mean']:.4f} / {v['token_cosine_min']:.4f} | "
                         f"{v['max_abs_diff']:.2g} | {100 * v['top10_overlap']:.1f}% | {100 * v['top1_agree']:.1f}% | "
                         f"{v['sumr']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--sentence", default=SENTENCE)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--checkpoint", help="a trained model (runs/train/model.pt): measure int8's ranking too")
    p.add_argument("--data", help="its collection (data/synth)")
    p.add_argument("--split", default="test")
    p.add_argument("--onnx-cache", help="folder of the ONNX exports (default: a fresh temp folder)")
    p.add_argument("--name", default="text_bench", help="results/<name>.json")
    p.add_argument("--results-dir", default=str(results.RESULTS))
    args = p.parse_args(argv)
    if "torch fp32" not in args.configs:
        p.error("--configs must include 'torch fp32': the reference")
    with tempfile.TemporaryDirectory(prefix="text-bench-") as tmp:
        cache = args.onnx_cache or tmp
        figures: dict[str, Any] = {"latency": {str(t): latency(args.configs, t, args.calls, args.warmup,
                                                                args.sentence, cache) for t in args.threads}}
        if args.checkpoint:
            torch.set_num_threads(max(args.threads))
            figures["quality"] = quality(args.configs, args.checkpoint, args.data, args.split, cache)
    md = markdown(figures)
    print(md)
    print(results.write(args.name, figures, md, folder=Path(args.results_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
