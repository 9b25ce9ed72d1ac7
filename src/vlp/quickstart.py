"""`vlp quickstart`: the main job on the embedded default, end to end.

Build the emoji set (if missing) -> pretrain a small ERNIE-ViL 2.0 whose text tower starts from the
packaged MiniLM checkpoint -> evaluate zero-shot on the held-out test emoji (never seen in training)
-> print a table and write `runs/quickstart/eval_test.json` -> index every emoji image for search
(`runs/quickstart/index`, served by `vlp serve`). Running it again reuses a finished run with the
same config, resumes an interrupted one, and starts afresh when the config changed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from vlp import config as config_lib

PRESET = Path(__file__).parent / "configs" / "emoji-ernie-vil2.toml"


def quickstart(out: str = "runs/quickstart", data: str = "data/emoji", overrides: list[str] | tuple = ()) -> dict:
    from vlp.data.emoji import build_emoji
    from vlp.data.formats import read_records
    from vlp.eval.retrieval import evaluate, format_table
    from vlp.train.checkpoint import load_checkpoint
    from vlp.train.loop import train

    t0 = time.perf_counter()
    counts = build_emoji(data)
    images = counts.get("images", {})
    shown = ", ".join(f"{n} {style}" for style, n in images.items()) if isinstance(images, dict) else images
    print(f"[1/4] emoji data in {data}: {counts.get('emoji', '?')} emoji, images: {shown} "
          f"({time.perf_counter() - t0:.0f} s)")

    cfg = config_lib.load(PRESET, [f'data.train="{Path(data) / "dataset.json"}"', f'train.out="{out}"', *overrides])
    run = Path(out)
    same = (run / "config.toml").is_file() and (run / "config.toml").read_text() == config_lib.dump(cfg)
    print(f"[2/4] pretraining {cfg.model.arch} ({cfg.model.image_encoder} image tower, text tower from "
          f"{cfg.model.text_init or 'scratch'}) for {cfg.train.steps} steps -> {run}"
          + (" (resuming / reusing the finished run)" if same else ""))
    t1 = time.perf_counter()
    train(cfg, resume=same, overwrite=True)
    train_s = time.perf_counter() - t1

    print("[3/4] zero-shot evaluation on the held-out test emoji")
    model, tok, cfg = load_checkpoint(run)
    records, _ = read_records(cfg.data.train, split="test")
    res = evaluate(model, tok, records, image_size=cfg.model.image_size, max_len=cfg.model.text_max_len)
    res.update(split="test", train_seconds=round(train_s, 1), total_seconds=round(time.perf_counter() - t0, 1))
    (run / "eval_test.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
    print(format_table(res))
    print(f"wrote {run / 'eval_test.json'}")

    print("[4/4] indexing every emoji image for search")
    from vlp.search.index import build_index
    index = run / "index"
    build_index(run, Path(data) / "dataset.json", index, overwrite=True)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s. Next:")
    print(f"  vlp serve {index}              # search page on http://127.0.0.1:8000")
    print(f"  vlp evaluate {run} --data {Path(data) / 'dataset.json'} --split test --lang zh")
    return res
