"""`vlp <command>`: each subcommand parses its arguments and calls one library function."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PRESETS = Path(__file__).parent / "configs"


def resolve_config(name: str) -> Path:
    """A TOML path, or the name of a bundled preset (`tiny`, `emoji-ernie-vil2`, ...)."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (PRESETS / name, PRESETS / f"{name}.toml"):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(q.stem for q in PRESETS.glob("*.toml")))
    raise SystemExit(f"error: config {name!r} is neither a file nor a bundled preset ({known})")


def _load_cfg(args):
    from vlp import config
    try:
        cfg = config.load(resolve_config(args.config), args.set or [])
    except config.ConfigError as e:
        raise SystemExit(f"error: {e}")
    if args.out:
        cfg.train.out = args.out
    return cfg


def cmd_data(args) -> None:
    from vlp.data.emoji import build_emoji
    counts = build_emoji(args.out, size=args.size, seed=args.seed)
    print(json.dumps(counts, indent=1, ensure_ascii=False))


def cmd_scenes(args) -> None:
    from vlp.data.scenes import build_scenes
    counts = build_scenes(args.out, emoji=args.emoji, n=args.n, size=args.size, seed=args.seed)
    print(json.dumps(counts, indent=1, ensure_ascii=False))


def cmd_regions(args) -> None:
    if args.what == "train":
        from vlp.regions import train_classifier
        model = train_classifier(args.data, args.out, steps=args.steps, batch_size=args.batch_size,
                                 image_size=args.image_size, lr=args.lr, seed=args.seed, trunk=args.trunk,
                                 stem=args.stem, identity=args.identity, words=args.words, bf16=False if args.no_bf16 else None,
                                 overwrite=args.overwrite, resume=args.resume)
        print(json.dumps(model.info, indent=1, ensure_ascii=False))
    elif args.what == "extract":
        from vlp.regions import extract_to_store
        stats = extract_to_store(args.classifier, args.data, args.out, split=args.split or None,
                                 max_regions=args.max_regions, batch_size=args.batch_size,
                                 feature_dtype=args.dtype, bf16=False if args.no_bf16 else None, whole_image=args.whole_image,
                                 crop_encoder=args.crop_encoder or None, roi_features=not args.crop_only,
                                 overwrite=args.overwrite)
        print(json.dumps(stats, indent=1, ensure_ascii=False))
    else:
        from vlp.data.regions import store_from_npz_dir, store_from_tsv
        store = (store_from_tsv(args.tsv, args.out, feature_dtype=args.dtype, overwrite=args.overwrite) if args.tsv
                 else store_from_npz_dir(args.npz_dir, args.out, feature_dtype=args.dtype, overwrite=args.overwrite))
        print(f"{len(store)} images in the region store {args.out}")


def cmd_tokenizer(args) -> None:
    from vlp.data.formats import read_records
    from vlp.data.tokenizer import Tokenizer
    records, report = read_records(args.data, split=args.split or None)
    tok = Tokenizer.train([c for r in records for c in r.captions], vocab_size=args.vocab_size)
    tok.save(args.out)
    print(f"trained a WordPiece vocabulary of {tok.vocab_size} tokens on {len(records)} records -> {args.out}"
          + (f" (skipped: {report.summary()})" if report.total() else ""))


def cmd_train(args) -> None:
    from vlp.train.loop import TrainingError
    from vlp.train.stages import train_stages
    cfg = _load_cfg(args)
    try:
        run = train_stages(cfg, resume=args.resume, init=getattr(args, "init", None), overwrite=args.overwrite)
    except TrainingError as e:
        raise SystemExit(f"error: {e}")
    print(f"run folder: {run}")


def cmd_evaluate(args) -> None:
    """The checkpoint's system decides how it is evaluated (embeddings, or cross-encoder scoring)."""
    from vlp import systems
    from vlp.data.formats import read_records
    from vlp.eval.retrieval import format_table
    from vlp.train.checkpoint import load_checkpoint
    model, tok, cfg = load_checkpoint(args.ckpt)
    records, report = read_records(args.data, image_root=args.image_root, split=args.split or None,
                                   lang=args.lang)
    if not records:
        raise SystemExit(f"error: no records for split {args.split!r} in {args.data} ({report.summary()})")
    opts = systems.EvalOptions(lang=args.lang, by=args.by, limit=args.limit, batch_size=args.batch_size,
                               regions=args.regions, first_stage=args.first_stage, rerank_k=args.rerank_k,
                               fuse=tuple(args.fuse), bf16=args.bf16)
    res = systems.get(cfg.model.arch).evaluate(model, tok, cfg, records, opts)
    res["checkpoint"], res["data"], res["split"] = str(args.ckpt), str(args.data), args.split
    if report.total():
        res["skipped_records"] = report.summary()
    print(format_table(res))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, ensure_ascii=False))
        print(f"wrote {args.out}")


def cmd_quickstart(args) -> None:
    from vlp.quickstart import CrossQuickstart, quickstart, quickstart_cross
    if args.system in ("imagebert", "interbert"):
        from vlp.config import parse_sets
        quickstart_cross(CrossQuickstart(args.system, out=args.out or "", data=args.data, regions="runs/quickstart-regions",
                                         pretrain=parse_sets(args.set or [])))
    else:
        quickstart(out=args.out or "runs/quickstart", data=args.data, overrides=args.set or [])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlp", description="vision-language pretraining, evaluation and search")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="build a dataset").add_subparsers(dest="dataset", required=True)
    e = d.add_parser("emoji", help="the embedded bilingual emoji set (OpenMoji + Twemoji)")
    e.add_argument("--out", default="data/emoji")
    e.add_argument("--size", type=int, default=64)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(fn=cmd_data)
    sc = d.add_parser("emoji-scenes", help="1-4 emoji per canvas with boxes and relational en/zh captions")
    sc.add_argument("--out", required=True)
    sc.add_argument("--emoji", default="data/emoji", help="the emoji set to draw from (`vlp data emoji`)")
    sc.add_argument("--n", type=int, default=3000, help="scenes in all, split 70/10/20 train/val/test")
    sc.add_argument("--size", type=int, default=128, help="canvas side in pixels")
    sc.add_argument("--seed", type=int, default=0)
    sc.set_defaults(fn=cmd_scenes)

    rg = sub.add_parser("regions", help="region features for single-stream models (ImageBERT)").add_subparsers(
        dest="what", required=True)
    rt = rg.add_parser("train", help="train the region classifier (the detector stand-in) on single emoji")
    rt.add_argument("--data", default="data/emoji/dataset.json")
    rt.add_argument("--out", required=True)
    rt.add_argument("--steps", type=int, default=140)
    rt.add_argument("--batch-size", type=int, default=32)
    rt.add_argument("--image-size", type=int, default=64)
    rt.add_argument("--lr", type=float, default=2e-3)
    rt.add_argument("--seed", type=int, default=0)
    rt.add_argument("--trunk", default="resnet18", help="any torchvision classifier name")
    rt.add_argument("--stem", default="small", choices=["small", "half", "default"],
                    help="ResNet stem: small (stride 1: 8x8 map at 64 px), half (stride 2: 4x4, 4x faster), default")
    rt.add_argument("--identity", action="store_true", help="also predict each emoji's identity")
    rt.add_argument("--words", action="store_true",
                    help="also predict the words of each emoji's English name (features that describe unseen emoji)")
    rt.add_argument("--no-bf16", action="store_true", help="float32 even where the CPU has native bf16 (default: bf16 there)")
    rt.add_argument("--overwrite", action="store_true")
    rt.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same settings)")
    rx = rg.add_parser("extract", help="RoIAlign region features over each image's boxes into a region store")
    rx.add_argument("classifier", help="folder written by `vlp regions train`")
    rx.add_argument("--data", required=True, help="manifest whose records carry boxes (e.g. emoji-scenes)")
    rx.add_argument("--split", default="")
    rx.add_argument("--out", required=True)
    rx.add_argument("--max-regions", type=int, default=36)
    rx.add_argument("--batch-size", type=int, default=32)
    rx.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    rx.add_argument("--whole-image", action="store_true",
                    help="one region per image covering all of it (images of one object, e.g. the emoji set)")
    rx.add_argument("--crop-encoder", default="", metavar="RUN",
                    help="a dual-encoder run (e.g. runs/quickstart): append its embedding of each box's crop "
                         "to the region feature")
    rx.add_argument("--crop-only", action="store_true",
                    help="with --crop-encoder: the region feature is the crop embedding alone, without the classifier's "
                         "RoI feature (which fits the classifier's training images; the crop embedding generalises)")
    rx.add_argument("--no-bf16", action="store_true", help="float32 even where the CPU has native bf16 (default: bf16 there)")
    rx.add_argument("--overwrite", action="store_true")
    ri = rg.add_parser("import", help="bottom-up-attention TSV files or a folder of .npz files -> a region store")
    src = ri.add_mutually_exclusive_group(required=True)
    src.add_argument("--tsv", nargs="+")
    src.add_argument("--npz-dir")
    ri.add_argument("--out", required=True)
    ri.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ri.add_argument("--overwrite", action="store_true")
    for parser in (rt, rx, ri):
        parser.set_defaults(fn=cmd_regions)

    t = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="what", required=True)
    tt = t.add_parser("train", help="train a WordPiece vocabulary on a dataset's captions")
    tt.add_argument("--data", required=True)
    tt.add_argument("--out", required=True)
    tt.add_argument("--split", default="train")
    tt.add_argument("--vocab-size", type=int, default=8000)
    tt.set_defaults(fn=cmd_tokenizer)

    for name, help_ in (("pretrain", "pretrain from a config"), ("finetune", "fine-tune a checkpoint")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="TOML file or bundled preset name")
        s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
        s.add_argument("--out", help="run folder (default runs/<train.name>)")
        s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
        s.add_argument("--overwrite", action="store_true", help="start again in a run folder that has checkpoints")
        if name == "finetune":
            s.add_argument("--init", required=True, help="checkpoint (run or step folder) to start from")
        s.set_defaults(fn=cmd_train)

    ev = sub.add_parser("evaluate", help="retrieval recall@K of a checkpoint")
    ev.add_argument("ckpt")
    ev.add_argument("--data", required=True, help="Karpathy JSON, COCO captions JSON, CSV/TSV/JSONL or shards")
    ev.add_argument("--split", default="test")
    ev.add_argument("--image-root", default=None)
    ev.add_argument("--lang", choices=["en", "zh"], default=None, help="keep captions of one language")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--by", help="also text->image recall per group of images: 'tag' (first tag, e.g. the "
                                 "emoji category) or a field of the image records")
    ev.add_argument("--regions", help="region store of the images (single-stream checkpoints)")
    ev.add_argument("--first-stage", help="dual-encoder checkpoint whose top k a single-stream model reranks")
    ev.add_argument("--rerank-k", type=int, default=16, help="candidates per query to rerank (with --first-stage)")
    ev.add_argument("--fuse", type=float, nargs="+", default=[0.0], metavar="W",
                    help="rerank by sigmoid(ITM) + W * first-stage cosine (0 = ITM alone, the paper; several W: "
                         "one result each)")
    ev.add_argument("--limit", type=int, help="evaluate the first N images with captions only (exhaustive scoring is slow)")
    ev.add_argument("--bf16", action="store_true", help="single-stream scoring under bf16 autocast (about 2x faster on CPUs with native bf16)")
    ev.add_argument("--out", help="write the metrics JSON here")
    ev.set_defaults(fn=cmd_evaluate)

    q = sub.add_parser("quickstart", help="the main job on the embedded emoji data, end to end")
    q.add_argument("--system", choices=["ernie-vil2", "imagebert", "interbert"], default="ernie-vil2",
                   help="ernie-vil2: the dual encoder on the emoji set (about 10 min); imagebert / interbert: scenes, "
                        "regions, two-stage pretraining, fine-tuning and reranked retrieval (about 30 min)")
    q.add_argument("--out", help="run folder (default runs/quickstart or runs/quickstart-<system>)")
    q.add_argument("--data", default="data/emoji")
    q.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    q.set_defaults(fn=cmd_quickstart)

    from vlp.search.cli import add_commands            # `vlp index`, `vlp serve`
    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        if os.environ.get("VLP_DEBUG"):
            raise
        raise SystemExit(f"error: {e}  (set VLP_DEBUG=1 for the traceback)")


if __name__ == "__main__":
    main(sys.argv[1:])
