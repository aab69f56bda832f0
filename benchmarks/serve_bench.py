"""Serving benchmark: REST latency / throughput through a real TorchServe, and the
in-process split of one query into text encoding, query encoding and scoring.

The corpus has the TVR test size (2,179 videos, K=32 clips, H=384), drawn like
search_bench.py's (`--corpus structured`: the similarity structure of a trained index;
`isotropic`: independent random vectors). The exact engine's cost depends only on the
sizes; an ANN engine's recall depends on the structure. The model is a real MS-SL++
checkpoint (``--checkpoint``; default a randomly initialised one with MiniLM text dims),
and queries go through the real MiniLM text encoder.

REST latency is taken one request at a time with a keep-alive connection of Python's
http.client (the server's time, as a load tool sees it), each request followed by one from
prvr.client (on requests, which adds its own per-request work): both are reported. Each
configuration's REST run is followed by the floor: the same TorchServe settings, batch
settings and clients through a handler that replays an answer recorded from the model
(ts_floor_handler.py), i.e. what TorchServe's own path costs for an answer of that size.

`--configs` names the configurations measured one after the other (CONFIGS: `default`, what
`prvr serve` runs, and variations of it), each over params.yaml and `--set`; in process the
exact and faiss engines are also timed side by side, with the faiss top-10
overlap against exact on search_bench.py's queries (noisy copies of a video's vectors:
a random-init model's text queries carry no structure to measure recall with).

    python benchmarks/serve_bench.py --name serve           # every configuration, results/serve.json
    python benchmarks/serve_bench.py --configs default --repeat 5 --name serve-repeat   # the spread
    python benchmarks/serve_bench.py --configs default --threads 1 --set search.backend=faiss --no-rest
"""
from __future__ import annotations

import argparse
import copy
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402 - results/NAME.json and its README block
import search_bench  # noqa: E402 - the shared corpus generator
from prvr.cli import add_config_args  # noqa: E402
from prvr.client import parse_server_timing  # noqa: E402
from prvr.config import load_config  # noqa: E402

QUERIES = ["a man opens the fridge", "a woman walks into the kitchen and sits down",
           "two people argue in the hallway", "someone picks up the phone and answers it",
           "a dog runs across the park", "the doctor looks at the x-ray",
           "he puts the cup on the table and leaves", "a girl laughs at the joke"]


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def make_checkpoint(path: Path, cfg, text_dim: int, encoder_name: str, video_dim: int = 1024) -> Path:
    """A random-weight MS-SL++ checkpoint whose config carries `cfg`'s text settings: the
    served worker builds its text encoder from them."""
    from prvr.model import PRVRModel

    cfg.model.video_dim, cfg.model.text_dim = video_dim, text_dim
    torch.manual_seed(0)
    torch.save({"state_dict": PRVRModel(cfg.model).state_dict(), "config": cfg.to_dict(), "epoch": 0,
                "metrics": {}, "text_encoder": encoder_name}, path)
    return path


def make_index(checkpoint: Path, out: Path, videos: int, version: str, corpus: str = "structured") -> Path:
    from prvr.encoding import load_model
    from prvr.model import VideoEmbeddings
    from prvr.checkpoint import sha256_file
    from prvr.search import build_index_from_embeddings

    _, cfg, ckpt = load_model(checkpoint)
    K, H, U = cfg.model.cluster_num, cfg.model.hidden_size, cfg.model.map_size
    if (K, H) != (search_bench.K, search_bench.H):
        raise SystemExit(f"the corpus generator makes K={search_bench.K} x H={search_bench.H}; "
                         f"the checkpoint has K={K}, H={H}")
    vectors = search_bench.make_corpus(videos, 1, "float32", None, kind=corpus)
    clips, attended = torch.from_numpy(np.asarray(vectors.clips)), torch.from_numpy(np.asarray(vectors.attended))
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, U, (videos, K, 1), generator=g)
    spans = torch.cat([start, (start + 1 + torch.randint(0, 4, (videos, K, 1), generator=g)).clamp_max(U)], -1)
    frames = torch.randint(64, 400, (videos,), generator=g)
    return build_index_from_embeddings(VideoEmbeddings(clips, spans, attended), frames.numpy(),
                                       [f"video{i:05d}" for i in range(videos)], out, model_version=version,
                                       map_size=U, alpha=cfg.model.alpha, checkpoint_sha256=sha256_file(checkpoint),
                                       text_encoder=ckpt["text_encoder"])


def engines_side_by_side(retriever, search_cfg, n: int) -> dict:
    """Single-query scoring time of the exact engine with each screen and of faiss on the served
    index, taken in turn on each query (so the machine's drift hits all alike), and the faiss
    top-10 overlap with exact on search_bench's structured queries."""
    from prvr.search import ExactSearch, FaissSearch
    from prvr.search.exact import bf16_supported

    index = retriever.index
    q = search_bench.make_queries(index, n, 2)
    engines = {f"exact_{screen}": ExactSearch(index, precision=screen)
               for screen in ("int8", "bf16") if screen == "int8" or bf16_supported()}
    t0 = time.perf_counter()
    engines["faiss"] = FaissSearch(index, search_cfg)
    out = {"faiss_build_s": time.perf_counter() - t0, "faiss_refine": search_cfg.refine,
           "faiss_candidates": search_cfg.candidates, "faiss_refine_codes": search_cfg.refine_codes,
           "interleaved": True}
    ms: dict[str, list[float]] = {name: [] for name in engines}
    for eng in engines.values():
        eng.search(q[:1], 10)
    for i in range(n):
        for name, eng in engines.items():
            t = time.perf_counter()
            eng.search(q[i:i + 1], 10)
            ms[name].append(1e3 * (time.perf_counter() - t))
    for name, values in ms.items():
        out[f"{name}_scoring_ms"] = {"p50": statistics.median(values), "p99": pct(values, 99)}
    exact = engines["exact_int8"].search(q, 10)
    out["faiss_overlap10"] = search_bench.overlap(engines["faiss"].search(q, 10).video_idx, exact.video_idx, 10)
    return out


def in_process(retriever, n: int) -> dict:
    """Per single query: text encoding (MiniLM), query encoding (MS-SL++), scoring (search engine)."""
    from prvr.views import collate_queries

    wall = {k: [] for k in ("text", "query", "score", "total")}
    cpu = {k: [] for k in ("text", "query", "score", "total")}
    clock = lambda: (time.perf_counter(), time.process_time())  # noqa: E731 - (wall, CPU of all threads)
    for i in range(n + 5):
        q = QUERIES[i % len(QUERIES)] + f" {i}"
        t0 = clock()
        feats = retriever.encoder.encode([q])
        t1 = clock()
        with torch.inference_mode():
            vec = retriever.model.encode_queries(*collate_queries(feats, retriever.cfg.model.max_desc_len))
        t2 = clock()
        retriever.engine.search(vec, top_k=10, alpha=retriever.default_alpha)
        t3 = clock()
        if i >= 5:  # warm-up
            for k, a, b in (("text", t0, t1), ("query", t1, t2), ("score", t2, t3), ("total", t0, t3)):
                wall[k].append(b[0] - a[0])
                cpu[k].append(b[1] - a[1])
    batch = torch.nn.functional.normalize(torch.randn(64, retriever.cfg.model.hidden_size), dim=-1)
    retriever.engine.search(batch, top_k=10, alpha=0.7)
    t = time.perf_counter()
    for _ in range(5):
        retriever.engine.search(batch, top_k=10, alpha=0.7)
    batched = (time.perf_counter() - t) / (5 * len(batch))
    ms = lambda xs: {"p50": 1e3 * statistics.median(xs), "p99": 1e3 * pct(xs, 99)}  # noqa: E731
    return {"text_encoding_ms": ms(wall["text"]), "query_encoding_ms": ms(wall["query"]),
            "scoring_ms": ms(wall["score"]), "total_ms": ms(wall["total"]),
            "cpu_ms": {k: ms(v) for k, v in cpu.items()},
            "scoring_batched_64_ms_per_query": 1e3 * batched, "queries": n}


def worker_means(ts) -> dict:
    """Mean ms per request inside the worker, from prvr's histograms on TorchServe's
    /metrics (recorded in deciseconds): where REST time goes that the in-process split does not show."""
    import requests

    sums: dict[str, list[float]] = {}
    for line in requests.get(f"{ts.metrics_url}/metrics", timeout=10).text.splitlines():
        for name in ("prvr_request_latency_deciseconds", "prvr_stage_deciseconds"):
            for part in ("_sum", "_count"):
                if line.startswith(name + part):
                    stage = line.split('stage="')[1].split('"')[0] if "stage=" in line else "handler"
                    sums.setdefault(stage, [0.0, 0.0])[part == "_count"] += float(line.rsplit(" ", 1)[1])
    return {f"{stage}_ms": 100 * s / c for stage, (s, c) in sums.items() if c}


class PlainHttp:
    """One keep-alive connection of the standard library's http.client: REST time without a
    client library's own per-request work (prvr.client, on requests, adds most of a millisecond)."""

    def __init__(self, url: str, key: str):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}

    def search(self, query: str, top_k: int) -> tuple[float, dict[str, float]]:
        """Round-trip ms (request sent to the last byte read) and the worker's Server-Timing stages."""
        body = json.dumps({"query": query, "top_k": top_k})
        t0 = time.perf_counter()
        self.conn.request("POST", "/predictions/prvr", body, self.headers)
        resp = self.conn.getresponse()
        data = resp.read()
        ms = 1e3 * (time.perf_counter() - t0)
        if resp.status != 200 or len(json.loads(data)["results"][0]["videos"]) != top_k:
            raise SystemExit(f"REST answer {resp.status}: {data[:200]!r}")
        return ms, parse_server_timing(resp.getheader("Server-Timing"))

    def close(self) -> None:
        self.conn.close()


def sequential(ts, n: int) -> dict:
    """n requests one at a time, each sent by both clients in turn (so the machine's drift hits
    both alike): the plain HTTP client's round trip, prvr.client's, the worker's stages."""
    from prvr.client import Client

    key = ts.keys()["inference"]
    lat: dict[str, list[float]] = {"plain": [], "prvr_client": []}
    stages: dict[str, list[float]] = {}
    plain = PlainHttp(ts.inference_url, key)
    # retries=0: a refused request must count as an error here, not be hidden by a retry
    with Client(ts.inference_url, key=key, retries=0) as api:
        for i in range(n + 5):
            ms, timing = plain.search(QUERIES[i % len(QUERIES)] + f" {i}", 10)
            answer = api.search(QUERIES[(i + 3) % len(QUERIES)] + f" {i}", top_k=10)
            if i >= 5:
                lat["plain"].append(ms)
                lat["prvr_client"].append(answer.timing.round_trip_ms)
                for stage, dur in timing.items():                   # the worker's own (Server-Timing)
                    stages.setdefault(stage, []).append(dur)
    plain.close()
    out = {f"{name}_{q}_ms": f(v) for name, v in lat.items()
           for q, f in (("p50", statistics.median), ("p99", lambda x: pct(x, 99)), ("mean", statistics.mean))}
    return {"requests": n, "p50_ms": out["plain_p50_ms"], "p99_ms": out["plain_p99_ms"], **out,
            "inside_worker_ms": {k: {"p50": statistics.median(v), "p99": pct(v, 99)} for k, v in stages.items()}}


def rest(ts, n: int, clients: int, per_client: int) -> dict:
    from prvr.client import ApiError, Client

    key = ts.keys()["inference"]
    seq = sequential(ts, n)
    seq["inside_worker_mean"] = worker_means(ts)

    def client(c: int) -> list[int]:
        codes = []
        with Client(ts.inference_url, key=key, retries=0) as api:
            for j in range(per_client):
                try:
                    api.search(QUERIES[j % len(QUERIES)] + f" {c}", top_k=10)
                    codes.append(200)
                except ApiError as exc:
                    codes.append(exc.status or 0)
        return codes

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        codes = [c for cs in pool.map(client, range(clients)) for c in cs]
    elapsed = time.perf_counter() - t0
    return {"sequential": seq,
            "concurrent": {"clients": clients, "requests": len(codes), "errors": sum(c != 200 for c in codes),
                           "seconds": elapsed, "throughput_rps": len(codes) / elapsed}}


def record_answer(ts) -> bytes:
    """One raw answer of the served model (the floor's archive replays it)."""
    import requests

    resp = requests.post(f"{ts.inference_url}/predictions/prvr", json={"query": QUERIES[0], "top_k": 10},
                         headers={"Authorization": f"Bearer {ts.keys()['inference']}"}, timeout=30)
    resp.raise_for_status()
    return resp.content


def floor(cfg, answer: bytes, tmp: Path, overrides: dict, n: int) -> dict:
    """TorchServe's own path: the same server settings, batch settings and clients, through a
    handler that replays a recorded answer and does nothing else (ts_floor_handler.py)."""
    from prvr.archive import model_config, run_archiver   # the batch size / delay the prvr archive gets
    from prvr.server import TorchServe

    work = tmp / "floor"
    (work / "store").mkdir(parents=True)
    (work / "answer.json").write_bytes(answer)
    (work / "model-config.yaml").write_text(model_config(cfg))
    run_archiver("prvr", "floor", Path(__file__).with_name("ts_floor_handler.py"), work / "answer.json",
                 work / "model-config.yaml", work / "store")
    with TorchServe(work / "ts", work / "store", {"prvr": "prvr.mar"}, overrides=overrides, free_ports=True) as ts:
        seq = sequential(ts, n)
    return {"answer_bytes": len(answer), **{k: v for k, v in seq.items() if k != "inside_worker_ms"}}


# What each named configuration changes over params.yaml (+ --set). `default` is what
# `prvr serve` runs; `fp32-text` the text encoder's float32 weights instead of int8 ones
# (another encoder by name: a model trained with it; top-10 agreement in text_bench.py);
# `batch-1` / `batch-4` answer each request alone / let it wait up to
# serve.max_batch_delay_ms for batch mates; `2-threads` two PyTorch / screen threads per
# worker; `bf16-screen` the exact engine's bf16 screen instead of the int8 one (search.screen);
# `two-step-screen` the int8 screen without the fused one (search.fused_screen); `low-latency`
# the faiss engine of docs/serving.md (approximate top-10: the engines row gives its overlap).
CONFIGS = {"default": [], "fp32-text": ["text.quantize=none"], "bf16-screen": ["search.screen=bf16"],
           "two-step-screen": ["search.fused_screen=false"], "2-threads": ["serve.threads=2"],
           "2-screen-threads": ["search.screen_threads=2"],
           "low-latency": ["search.backend=faiss", "search.refine=1000", "search.candidates=30",
                           "search.refine_codes=fp16"],
           "batch-1": ["serve.batch_size=1"], "batch-4": ["serve.batch_size=4"]}


def measure(cfg, args, tmp: Path) -> dict:
    """One configuration: in-process split, engines side by side, then REST through TorchServe."""
    from prvr.archive import build_archive
    from prvr.server import TorchServe
    from prvr.serving import Retriever
    from prvr.text import TextEncoder

    threads = args.threads or cfg.serve.threads
    torch.set_num_threads(threads)
    os.environ["PRVR_TORCH_THREADS"] = str(threads)      # inherited by the TorchServe worker
    if args.text_precision != "float32":
        cfg.text.quantize = "none"                    # int8 quantizes the float32 encoder only
    cfg.text.precision = args.text_precision
    encoder = TextEncoder.from_config(cfg, threads=cfg.serve.text_threads)        # as in the worker
    ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(
        tmp / "model.pt", copy.deepcopy(cfg), encoder.dim, encoder.name)
    index = make_index(ckpt, tmp / "index", args.videos, "bench", args.corpus)
    retriever = Retriever.load(ckpt, index, "bench", encoder=encoder, search_cfg=cfg.search)
    result = {"videos": args.videos, "corpus": args.corpus, "torch_threads": torch.get_num_threads(),
              "text_encoder": encoder.name, "text_runtime": cfg.text.runtime, "text_quantize": cfg.text.quantize,
              "backend": cfg.search.backend, "screen": cfg.search.screen, "fused_screen": cfg.search.fused_screen,
              "serve_batch_size": cfg.serve.batch_size,
              "max_batch_delay_ms": cfg.serve.max_batch_delay_ms,
              "load_avg_at_start": list(os.getloadavg()),
              "in_process": in_process(retriever, args.requests),
              "engines": engines_side_by_side(retriever, cfg.search, args.requests)}
    del retriever
    if not args.no_rest:
        mar = build_archive(ckpt, index, tmp / "store", "bench", "prvr", cfg)
        ts_set = dict(kv.split("=", 1) for kv in args.ts_set)
        with TorchServe(tmp / "ts", tmp / "store", {"prvr": mar.name}, overrides=ts_set, free_ports=True) as ts:
            result["rest"] = rest(ts, args.requests, args.clients, args.per_client)
            result["rest"]["torchserve_overrides"] = ts_set
            answer = record_answer(ts)
        result["rest"]["floor"] = floor(cfg, answer, tmp, ts_set, args.requests)
    result["load_avg_at_end"] = list(os.getloadavg())
    return result


def report(name: str, result: dict) -> None:
    ip = result["in_process"]
    rows = [("in-process text encoding (MiniLM)", ip["text_encoding_ms"]),
            ("in-process query encoding (MS-SL++)", ip["query_encoding_ms"]),
            ("in-process scoring, 1 query", ip["scoring_ms"]),
            ("in-process total, 1 query", ip["total_ms"]),
            ("  CPU time: total (all threads)", ip["cpu_ms"]["total"])]
    print(f"[{name}] corpus {result['videos']} videos x 32 clips x 384 ({result['corpus']}); text encoder "
          f"{result['text_encoder']}; served engine {result['backend']}; torch threads {result['torch_threads']}; "
          f"load avg {result['load_avg_at_start'][0]:.1f} -> {result['load_avg_at_end'][0]:.1f}")
    print(f"{'':44}{'p50 ms':>10}{'p99 ms':>10}")
    for label, v in rows:
        print(f"{label:44}{v['p50']:>10.2f}{v['p99']:>10.2f}")
    en = result["engines"]
    engines = ", ".join(f"{k[:-len('_scoring_ms')]} {v['p50']:.2f}" for k, v in en.items() if k.endswith("_scoring_ms"))
    print(f"  scoring 1 query, engines taken in turn (p50 ms): {engines}; faiss top-10 overlap with "
          f"exact {en['faiss_overlap10']:.3f}")
    if "rest" in result:
        s, c = result["rest"]["sequential"], result["rest"]["concurrent"]
        print(f"{'REST single text query, end to end':44}{s['p50_ms']:>10.2f}{s['p99_ms']:>10.2f}")
        print(f"{'  the same sent with prvr.client':44}{s['prvr_client_p50_ms']:>10.2f}{s['prvr_client_p99_ms']:>10.2f}")
        for stage in ("encode", "score"):
            v = s["inside_worker_ms"][stage]
            print(f"{'  inside the worker (Server-Timing): ' + stage:44}{v['p50']:>10.2f}{v['p99']:>10.2f}")
        f = result["rest"]["floor"]
        print(f"{'  TorchServe alone (replayed answer)':44}{f['p50_ms']:>10.2f}{f['p99_ms']:>10.2f}")
        print(f"{'  TorchServe alone, with prvr.client':44}{f['prvr_client_p50_ms']:>10.2f}"
              f"{f['prvr_client_p99_ms']:>10.2f}")
        print(f"REST throughput: {c['throughput_rps']:.1f} req/s with {c['clients']} clients "
              f"({c['requests']} requests, {c['errors']} errors)")


def headline(r: dict) -> dict:
    """One run's p50s, throughput and load: what --repeat lists for each run (the in-process
    total of one query, measured before TorchServe starts, tells how fast the machine was)."""
    seq, w = r["rest"]["sequential"], r["rest"]["sequential"]["inside_worker_ms"]
    return {"rest_p50_ms": seq["p50_ms"], "prvr_client_p50_ms": seq["prvr_client_p50_ms"],
            "floor_p50_ms": r["rest"]["floor"]["p50_ms"], "encode_p50_ms": w["encode"]["p50"],
            "score_p50_ms": w["score"]["p50"], "throughput_rps": r["rest"]["concurrent"]["throughput_rps"],
            "in_process_total_p50_ms": r["in_process"]["total_ms"]["p50"],
            "load_avg_at_start": r["load_avg_at_start"][0]}


def engine_detail(r: dict) -> str:
    """The exact engine's screen(s), or what faiss re-scores and re-ranks."""
    if r["backend"] == "exact":
        return r["screen"] + (" + fused" if r["fused_screen"] and r["screen"] == "int8" else "")
    e = r["engines"]
    return f"{e['faiss_refine']} hits by {e['faiss_refine_codes']}, {e['faiss_candidates']} re-ranked"


def markdown(results_by_config: dict[str, dict]) -> str:
    """Side by side: REST end to end, the worker's stages, the in-process split, throughput."""
    names = list(results_by_config)
    rows = []

    def row(label: str, get) -> None:
        cells = []
        for n in names:
            try:
                cells.append(get(results_by_config[n]))
            except KeyError:
                cells.append("-")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    ms = lambda v: f"{v['p50']:.2f} / {v['p99']:.2f}"  # noqa: E731
    row("text encoder", lambda r: f"{r['text_runtime']} {r['text_quantize']}")
    row("engine (screen or re-score); worker batch size; threads",
        lambda r: f"{r['backend']} ({engine_detail(r)}); {r['serve_batch_size']}; {r['torch_threads']}")
    row("REST end to end, 1 typed query, p50 / p99 ms",
        lambda r: f"{r['rest']['sequential']['p50_ms']:.2f} / {r['rest']['sequential']['p99_ms']:.2f}")
    row("the same sent with prvr.client, p50 / p99 ms", lambda r: f"{r['rest']['sequential']['prvr_client_p50_ms']:.2f}"
        f" / {r['rest']['sequential']['prvr_client_p99_ms']:.2f}")
    row("TorchServe alone: the same request, a handler replaying a recorded answer, p50 / p99 ms",
        lambda r: f"{r['rest']['floor']['p50_ms']:.2f} / {r['rest']['floor']['p99_ms']:.2f}")
    row("TorchServe alone, with prvr.client, p50 / p99 ms", lambda r: f"{r['rest']['floor']['prvr_client_p50_ms']:.2f}"
        f" / {r['rest']['floor']['prvr_client_p99_ms']:.2f}")
    row("in the worker: encode (text + query), p50 / p99 ms", lambda r: ms(r["rest"]["sequential"]["inside_worker_ms"]["encode"]))
    row("in the worker: score, p50 / p99 ms", lambda r: ms(r["rest"]["sequential"]["inside_worker_ms"]["score"]))
    row("in process: text encoding, p50 / p99 ms", lambda r: ms(r["in_process"]["text_encoding_ms"]))
    row("in process: query encoding, p50 / p99 ms", lambda r: ms(r["in_process"]["query_encoding_ms"]))
    row("in process: scoring, p50 / p99 ms", lambda r: ms(r["in_process"]["scoring_ms"]))
    row("in process, 1 query, engines in turn: exact int8 / exact bf16 / faiss, p50 ms",
        lambda r: " / ".join(f"{r['engines'][f'{e}_scoring_ms']['p50']:.2f}" if f"{e}_scoring_ms" in r["engines"]
                             else "-" for e in ("exact_int8", "exact_bf16", "faiss")))
    row("that faiss's top-10 overlap with exact", lambda r: f"{r['engines']['faiss_overlap10']:.3f}")
    if any("repeats" in r for r in results_by_config.values()):
        for label, key in (("REST p50 of each run, ms", "rest_p50_ms"),
                           ("the same with prvr.client, ms", "prvr_client_p50_ms"),
                           ("in the worker: score p50 of each run, ms", "score_p50_ms"),
                           ("in process, 1 query, total p50 of each run (the machine's speed), ms",
                            "in_process_total_p50_ms"),
                           ("load average at each run's start", "load_avg_at_start")):
            row(label, lambda r, key=key: ", ".join(f"{x[key]:.2f}" for x in r["repeats"]))
    row("REST throughput, 4 clients, req/s (errors)",
        lambda r: f"{r['rest']['concurrent']['throughput_rps']:.1f} ({r['rest']['concurrent']['errors']})")
    first = results_by_config[names[0]]
    head = [f"| {first['videos']:,} videos x 32 clips | "
            + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    return "\n".join(head + rows) + (
        "\n\nREST: one request at a time from a keep-alive connection of Python's http.client "
        "(sent to the last byte read); each request is followed by one from prvr.client (requests), "
        "whose own work per request is the difference. "
        "The exact engine certifies its top-10 (the ranking `prvr evaluate` computes, "
        "tests/test_serving.py); faiss's is approximate (its overlap row: the faiss settings of the column). "
        "A random-weight model over search_bench's structured corpus.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="configurations measured one after the other in this run (default: all)")
    p.add_argument("--checkpoint", default=None, help="MS-SL++ checkpoint (default: random init, MiniLM dims)")
    p.add_argument("--videos", type=int, default=2179, help="corpus size (default: TVR test, 2179)")
    p.add_argument("--requests", type=int, default=200, help="sequential REST requests / in-process queries")
    p.add_argument("--clients", type=int, default=4, help="concurrent REST clients")
    p.add_argument("--per-client", type=int, default=50, help="requests per concurrent client")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, in process and in the TorchServe worker (PRVR_TORCH_THREADS); "
                        "default serve.threads")
    p.add_argument("--text-precision", default="float32", choices=("float32", "bfloat16"),
                   help="text.precision of the (random) checkpoint: the MiniLM's matmul precision")
    p.add_argument("--corpus", default="structured", choices=("structured", "isotropic"),
                   help="corpus vectors, as in search_bench.py (recall depends on it, exact speed does not)")
    p.add_argument("--no-rest", action="store_true", help="skip TorchServe (in-process numbers only)")
    p.add_argument("--ts-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a serving/config.properties entry for the run (repeatable)")
    add_config_args(p)
    p.add_argument("--repeat", type=int, default=1,
                   help="measure each configuration this many times, each with its own TorchServe: the "
                        "run-to-run spread of a shared machine (the first run's figures are the column's)")
    p.add_argument("--name", default=None, help="write results/NAME.json (benchmarks/results.py) and its block")
    args = p.parse_args(argv)
    if args.name and args.no_rest:
        p.error("--name records REST figures: drop --no-rest")
    started, measured = results.meta(argv), {}
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    for name in args.configs:
        runs = []
        for _ in range(args.repeat):
            cfg = load_config(args.params, args.overrides + CONFIGS[name])
            with tempfile.TemporaryDirectory(prefix="prvr-serve-bench-") as tmp:
                runs.append(measure(cfg, args, Path(tmp)))
            report(name, runs[-1])
        measured[name] = runs[0] if args.repeat == 1 else {**runs[0], "repeats": [headline(r) for r in runs]}
    if args.name:
        print(results.write(args.name, measured, markdown(measured), argv, started=started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
