"""`prvr index build` and `prvr index search`."""
from __future__ import annotations

import argparse
from typing import Any

from prvr.checkpoint import sha256_file
from prvr.cli.common import add_config_args, config_from_args
from prvr.config import ANN_INDEX_TYPES
from prvr.encoding import QueryEncoder
from prvr.errors import SearchIndexError
from prvr.indexing import build_index
from prvr.search import VideoIndex, make_engine


def _build(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    path = build_index(args.checkpoint, args.data, args.videos or cfg.serve.corpus, args.out, cfg,
                       model_version=args.model_version, batch_size=args.batch_size, ann_type=args.ann,
                       data_version=args.data_version)
    m = VideoIndex.load(path).manifest
    print(f"index {path}: {m['count']} videos ({m['corpus']}) x {m['num_clips']} clips x {m['hidden']} "
          f"({m['dtype']}), model version {m['model_version']}"
          + (f", faiss {m['ann']['index_type']}" if m.get("ann") else ""))
    return 0


def _search(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    index = VideoIndex.load(args.index)
    sha = index.manifest.get("checkpoint_sha256")
    if sha and sha != sha256_file(args.checkpoint):
        raise SearchIndexError(f"index {args.index} was built with another checkpoint than "
                               f"{args.checkpoint} (sha256 {sha[:12]}...): rebuild it")
    queries = QueryEncoder.from_checkpoint(args.checkpoint).encode_texts(args.query)
    res = make_engine(index, cfg.search).search(queries, args.top_k)
    fps = index.manifest.get("fps")
    for qi, text in enumerate(args.query):
        print(f"query: {text}")
        print(f"{'rank':>4}  {'video':<24}{'fused':>8}{'clip':>8}{'frame':>8}  moment")
        for r in range(res.video_idx.shape[1]):
            v = int(res.video_idx[qi, r])
            if v < 0:
                break
            s, e = index.moment(v, int(res.key_clip[qi, r]))
            moment = f"{s / fps:.1f}-{e / fps:.1f} s" if fps else f"frames {s}-{e}"
            print(f"{r + 1:>4}  {index.video_ids[v]:<24}{float(res.fused[qi, r]):>8.4f}"
                  f"{float(res.clip[qi, r]):>8.4f}{float(res.frame[qi, r]):>8.4f}  {moment}")
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("index", help="build or query a video index for fast retrieval",
                              description="Precompute the K clip and K attended vectors of every "
                                          "video, then search them exactly or approximately.")
    sub = p.add_subparsers(dest="index_command", metavar="ACTION")
    sub.required = True
    b = sub.add_parser("build", help="encode a corpus's videos into an index folder (atomic swap)")
    b.add_argument("--checkpoint", required=True, help="model.pt written by `prvr train`")
    b.add_argument("--data", required=True, help="collection folder ROOT/COLL")
    b.add_argument("--videos", "--split", dest="videos", default=None, metavar="all|SPLIT|FILE",
                   help="the corpus: all (every video in FeatureData), a split (train | val | test) or a "
                        "file of video ids, one per line (default: serve.corpus, all)")
    b.add_argument("--data-version", default=None,
                   help="data version recorded in the manifest and answered by the service")
    b.add_argument("--out", required=True, help="index folder to write (replaced atomically)")
    b.add_argument("--model-version", default=None,
                   help="version string recorded in the manifest (default: checkpoint sha256)")
    b.add_argument("--ann", choices=list(ANN_INDEX_TYPES), default=None,
                   help="also build a faiss index of this type (parameters from search.*)")
    b.add_argument("--batch-size", type=int, default=64, help="videos encoded per batch")
    add_config_args(b)
    b.set_defaults(func=_build)
    s = sub.add_parser("search", help="rank an index's videos for text queries")
    s.add_argument("--index", required=True, help="index folder written by `prvr index build`")
    s.add_argument("--checkpoint", required=True, help="the checkpoint the index was built with")
    s.add_argument("--query", required=True, action="append", help="query text (repeatable)")
    s.add_argument("--top-k", type=int, default=10, help="results per query (default 10)")
    add_config_args(s)
    s.set_defaults(func=_search)
