"""`vlp index` and `vlp serve`: registered on the main parser by `add_commands(sub)`."""
from __future__ import annotations

import argparse
import json

from vlp.search import KINDS, check_rerank


def cmd_index(args: argparse.Namespace) -> None:
    from vlp.search.index import build_index
    summary = build_index(args.ckpt, args.data, args.out, kind=args.kind, batch_size=args.batch_size,
                          split=args.split or None, image_root=args.image_root, chunk_size=args.chunk_size,
                          overwrite=args.overwrite)
    shown = {k: v for k, v in summary.items() if k not in ("fingerprint", "skipped_examples")}
    print(json.dumps(shown, indent=1, ensure_ascii=False))
    if summary.get("skipped"):
        print(f"skipped {summary['skipped']} unreadable images: see {args.out}/skipped.jsonl")
    print(f"next: vlp serve {args.out}")


def cmd_serve(args: argparse.Namespace) -> None:
    check_rerank(args.rerank)                         # before the slow imports
    from vlp.search.server import serve
    serve(args.index, host=args.host, port=args.port, rerank=args.rerank, threads=args.threads)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `index` and `serve` on the `vlp` subcommand parser."""
    ix = sub.add_parser("index", help="embed a collection with a checkpoint and build a search index")
    ix.add_argument("ckpt", help="checkpoint: a run folder or a step folder")
    ix.add_argument("--data", required=True, help="manifest (Karpathy/COCO JSON, CSV/TSV/JSONL, shards) or a "
                                                  "folder of images")
    ix.add_argument("--out", required=True, help="index folder to write (an interrupted build resumes there)")
    ix.add_argument("--kind", choices=KINDS, default="flat", help="flat = exact; ivf / hnsw for large collections")
    ix.add_argument("--split", default="", help="index only this split of the manifest (default: all)")
    ix.add_argument("--image-root", default=None, help="folder relative image paths resolve against")
    ix.add_argument("--batch-size", type=int, default=64)
    ix.add_argument("--chunk-size", type=int, default=1024, help="images per saved chunk (the resume unit)")
    ix.add_argument("--overwrite", action="store_true", help="replace an index of other data in --out")
    ix.set_defaults(fn=cmd_index)

    sv = sub.add_parser("serve", help="serve an index: web page + JSON API")
    sv.add_argument("index", help="index folder written by `vlp index`")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--rerank", default=None, metavar="CKPT", help="cross-encoder checkpoint to rerank the top-k: "
                                                                   "not available yet, an error for now")
    sv.add_argument("--threads", type=int, default=1, help="PyTorch/FAISS threads per request (requests already "
                                                           "run in parallel)")
    sv.set_defaults(fn=cmd_serve)
