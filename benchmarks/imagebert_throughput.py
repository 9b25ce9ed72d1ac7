"""Training throughput of our single-stream ImageBERT against Hugging Face's VisualBERT, in one process.

Same size for all: hidden 256, 4 layers, 4 heads, MLP 1024, the 30,522-token BERT vocabulary,
32 text tokens + 36 regions of 2048-d features (bottom-up-attention size), batch 128. Same work per
step: masked language modelling on 15% of the text tokens and image-text matching on [CLS], then
backward and a fused AdamW update. Three models alternate round by round:
- `ours`: `vlp.models.single_stream.ImageBERT` (MLM decoder only at the masked tokens);
- `peer`: `transformers.VisualBertForPreTraining` as shipped (its MLM head projects every position,
  text and visual, onto the vocabulary, then ignores all but the labelled ones);
- `peer_masked`: the same VisualBERT with its own heads applied at the masked tokens only, the trick
  ours uses, so the ratio against it measures the transformer itself.
Reports pairs/s, the median per-round ratio against each peer, achieved GFLOP/s as a fraction of
this machine's matmul peak (`train_throughput.matmul_peak`), and peak memory of a step in a fresh process.
Prints one JSON line per precision and writes results/imagebert_throughput.json.

    python benchmarks/imagebert_throughput.py [--steps 2] [--rounds 6] [--precision fp32 bf16]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from train_throughput import FLOP_FORMULAS, default_precisions, environment, matmul_peak, peak_over_two_steps, save
from vlp.data.collate import Batch
from vlp.data.masking import IGNORE, mask_tokens
from vlp.encoders.text import TextEncoder
from vlp.layers import BertConfig, TransformerConfig
from vlp.models.single_stream import ImageBERT

RESULTS = Path(__file__).parent / "results" / "imagebert_throughput.json"
MODELS = ("ours", "peer", "peer_masked")
SIZE = dict(width=256, layers=4, heads=4, mlp=1024, vocab=30522, tokens=32, regions=36, feature=2048)


def build(name: str) -> nn.Module:
    s = SIZE
    if name == "ours":
        text = TextEncoder(BertConfig(vocab_size=s["vocab"], max_position=512, transformer=TransformerConfig(
            width=s["width"], layers=s["layers"], heads=s["heads"], intermediate=s["mlp"])))
        return ImageBERT(text, feature_dim=s["feature"], n_classes=1601)
    cfg = transformers.VisualBertConfig(vocab_size=s["vocab"], hidden_size=s["width"], num_hidden_layers=s["layers"],
                                        num_attention_heads=s["heads"], intermediate_size=s["mlp"],
                                        visual_embedding_dim=s["feature"])
    return transformers.VisualBertForPreTraining(cfg)


def make_batch(batch: int, seed: int = 0) -> Batch:
    """Text (B, 32) with 15% MLM labels on every row, regions (B, 36, 2048), random ITM labels."""
    s, g = SIZE, torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, s["tokens"] + 1, (batch,), generator=g)
    mask = torch.arange(s["tokens"])[None] < lengths[:, None]
    ids = torch.randint(1000, s["vocab"], (batch, s["tokens"]), generator=g) * mask
    ids[:, 0], ids[torch.arange(batch), lengths - 1] = 101, 102
    masked, labels = mask_tokens(ids, mask, mask_id=103, special_ids=[0, 100, 101, 102, 103], vocab_size=s["vocab"],
                                 gen=g)
    R = s["regions"]
    return Batch(images=None, text_ids=masked, text_mask=mask, group=torch.arange(batch),
                 region_feats=torch.rand(batch, R, s["feature"], generator=g),
                 region_boxes=torch.rand(batch, R, 5, generator=g), region_mask=torch.ones(batch, R, dtype=torch.bool),
                 mlm_labels=labels, itm_label=torch.randint(0, 2, (batch,), generator=g).float())


def loss_fn(name: str, model: nn.Module, b: Batch) -> Tensor:
    """MLM + ITM loss of one batch, each model its own way."""
    if name == "ours":
        out = model(b)
        mlm = F.cross_entropy(out.mlm_logits.float(), b.mlm_labels[b.mlm_labels != IGNORE])
        return mlm + F.binary_cross_entropy_with_logits(out.itm_logit.float(), b.itm_label)
    inputs = dict(input_ids=b.text_ids, attention_mask=b.text_mask.long(), visual_embeds=b.region_feats,
                  visual_attention_mask=b.region_mask.long())
    if name == "peer":   # labels span text + visual positions; the visual ones are ignored
        labels = torch.cat([b.mlm_labels, torch.full(b.region_mask.shape, IGNORE)], 1)
        return model(**inputs, labels=labels, sentence_image_labels=b.itm_label.long()).loss
    seq, pooled = model.visual_bert(**inputs)[:2]                       # (B, L+R, D), (B, D)
    sel = torch.cat([b.mlm_labels != IGNORE, torch.zeros(b.region_mask.shape, dtype=torch.bool)], 1)
    logits = model.cls.predictions(seq[sel])                            # (M, V) at the masked tokens only
    itm = model.cls.seq_relationship(pooled)                            # (B, 2)
    return F.cross_entropy(logits.float(), b.mlm_labels[b.mlm_labels != IGNORE]) + F.cross_entropy(
        itm.float(), b.itm_label.long())


def make_step(name: str, model: nn.Module, batch: Batch, precision: str) -> Callable[[], float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step() -> float:
        with autocast():
            loss = loss_fn(name, model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def step_flops(name: str, model: nn.Module, batch: Batch, precision: str) -> int:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        with autocast:
            loss = loss_fn(name, model, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def child_memory(name: str, precision: str, args: argparse.Namespace) -> dict:
    """In a fresh process: peak RSS growth over two training steps."""
    torch.manual_seed(0)
    model, batch = build(name).train(), make_batch(args.batch)
    base, peak = peak_over_two_steps(make_step(name, model, batch, precision))
    return {"peak_mb": round(peak - base, 1)}


def measure(precision: str, models: dict[str, nn.Module], batch: Batch, args: argparse.Namespace) -> dict:
    """Alternate the models round by round (order rotated); median pairs/s and per-round ratios."""
    steps = {name: make_step(name, m, batch, precision) for name, m in models.items()}
    for name in MODELS:
        for _ in range(args.warmup):
            steps[name]()
    rates: dict[str, list[float]] = {name: [] for name in MODELS}
    for r in range(args.rounds):
        for name in MODELS[r % 3:] + MODELS[:r % 3]:
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            rates[name].append(args.steps * args.batch / (time.perf_counter() - start))
    ratio = {peer: statistics.median(o / p for o, p in zip(rates["ours"], rates[peer])) for peer in MODELS[1:]}
    return {"median": {n: statistics.median(v) for n, v in rates.items()}, "ratio": ratio,
            "rounds": {n: [round(x, 1) for x in v] for n, v in rates.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=default_precisions(),
                   help="default: fp32, and bf16 where this CPU has native bf16")
    p.add_argument("--out", type=Path, default=RESULTS, help="results file (JSON lines)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child_memory(*args.child, args)))
        return
    torch.manual_seed(0)
    models = {name: build(name).train() for name in MODELS}
    batch = make_batch(args.batch)
    results = []
    for precision in args.precision:
        before = matmul_peak(precision)
        flops = {name: step_flops(name, m, batch, precision) for name, m in models.items()}
        rate = measure(precision, models, batch, args)
        after = matmul_peak(precision)
        peak = max(max(before[w], after[w]) for w in before)
        fraction = {n: flops[n] * rate["median"][n] / args.batch / 1e9 / peak for n in MODELS}
        row = {"benchmark": "imagebert_throughput", "precision": precision, "batch": args.batch,
               **{f"{n}_pairs_per_s": round(rate["median"][n], 1) for n in MODELS},
               "ratio": round(rate["ratio"]["peer"], 3), "ratio_vs_peer_masked": round(rate["ratio"]["peer_masked"], 3),
               **{f"{n}_peak_fraction": round(fraction[n], 3) for n in MODELS},
               "peak_fraction": round(fraction["ours"], 3), "matmul_peak_gflops": peak,
               **{f"{n}_step_gflop": round(flops[n] / 1e9, 2) for n in MODELS}}
        if not args.no_memory:
            for n in MODELS:
                cmd = [sys.executable, __file__, "--batch", str(args.batch), "--child", n, precision]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                row[f"{n}_peak_mb"] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
        row |= {"steps": args.steps, "rounds": args.rounds, "rounds_pairs_per_s": rate["rounds"],
                "params": {n: sum(q.numel() for q in m.parameters()) for n, m in models.items()},
                "peer": f"transformers {transformers.__version__} VisualBertForPreTraining", "size": SIZE,
                **environment()}
        print(json.dumps(row), flush=True)
        results.append(row)
    save(results, args.out)


if __name__ == "__main__":
    main()
