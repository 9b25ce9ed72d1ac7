"""Retrieval evaluation of a dual encoder by the papers' protocol: held-out images and their captions
ranked both ways (Karpathy & Fei-Fei, "Deep Visual-Semantic Alignments for Generating Image Descriptions",
CVPR 2015: the splits in Sec. 4, "Datasets", the ranking in Sec. 4.1), reported as R@1/5/10 as in the
ImageBERT (Qi et al. 2020) and UNITER (Chen et al., ECCV 2020) retrieval experiments; see `vlp.metrics`.

Embed every test image and caption once, then compute recall@K in memory-bounded chunks
(`vlp.metrics`). Several drawing styles (records with meta["style"]) are separate galleries: a
caption has one ground-truth image per style, so text->image and image->text are computed per style
and averaged, and image->image is measured across styles (first style queries, second is the gallery,
matched on meta["hex"]). Results per caption language sit under their language code.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor
from tqdm import tqdm

from vlp import metrics
from vlp.data.formats import Record, SkipReport
from vlp.data.pairs import decode_images
from vlp.data.transforms import normalize

KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], max_len: int, batch_size: int = 256,
                progress: bool = False) -> Tensor:
    """-> (N, D) unit vectors."""
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc="embed texts", disable=not progress, leave=False):
        ids, mask = tokenizer.encode(texts[i:i + batch_size], max_len)
        out.append(model.encode_text(ids, mask).float())
    return torch.cat(out)


@torch.no_grad()
def embed_images(model, images: Tensor, batch_size: int = 256, progress: bool = False) -> Tensor:
    """images: (N, 3, S, S) uint8 -> (N, D) unit vectors."""
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="embed images", disable=not progress, leave=False):
        out.append(model.encode_image(normalize(images[i:i + batch_size])).float())
    return torch.cat(out)


def _t2i_top1_same(text_emb: Tensor, image_emb: Tensor, text_to_image: Tensor, same: Tensor, chunk: int = 4096
                   ) -> float:
    """Percent of captions whose top image is 'the same' as the ground truth by `same` (N_img, N_img) bool."""
    hits = 0
    for i in range(0, len(text_emb), chunk):
        top = (text_emb[i:i + chunk] @ image_emb.t()).argmax(1)                # (c,)
        hits += same[text_to_image[i:i + chunk], top].sum().item()
    return 100.0 * hits / max(1, len(text_emb))


def _mean(dicts: list[dict]) -> dict:
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in dicts[0] if isinstance(dicts[0][k], (int, float))}


def group_of(record: Record, by: str) -> str:
    """The value a record is grouped by in `evaluate(by=...)`: "tag" = its first tag (the emoji
    category), anything else a field of the manifest's image record (e.g. "style")."""
    if by == "tag":
        return record.tags[0] if record.tags else ""
    value = record.meta.get(by)
    return "" if value is None else str(value)


def evaluate(model, tokenizer, records: list[Record], image_size: int, max_len: int, batch_size: int = 256,
             lang: str | None = None, progress: bool = True, by: str | None = None) -> dict:
    """Recall@K both ways (+ per language, + cross-style image->image when there are styles) -> flat dict.

    by: also text->image recall of the captions of each group of images (`group_of`), against the
    whole gallery, per language -> result["by_<by>"][group][language or "all"]."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    report = SkipReport()
    kept, images = decode_images(records, image_size, report, progress=progress)
    img_emb = embed_images(model, images, batch_size, progress)
    caps = [(c, lg, i) for i, r in enumerate(kept) for c, lg in zip(r.captions, r.langs) if lang in (None, lg)]
    if not caps:
        raise ValueError(f"no captions to evaluate (lang={lang!r})")
    txt_emb = embed_texts(model, tokenizer, [c for c, _, _ in caps], max_len, batch_size, progress)
    cap_img = torch.tensor([i for _, _, i in caps])
    cap_lang = [lg for _, lg, _ in caps]
    styles = sorted({r.meta.get("style", "") for r in kept})
    style_of = [r.meta.get("style", "") for r in kept]
    base_ids = {b: j for j, b in enumerate(dict.fromkeys(r.meta.get("base", r.image_id) for r in kept))}
    base = torch.tensor([base_ids[r.meta.get("base", r.image_id)] for r in kept])           # (N_img,)
    same_base = (base[:, None] == base[None, :]) if "base" in kept[0].meta else None       # (N_img, N_img)

    def block(cap_sel: list[int]) -> dict:
        """Metrics for the chosen captions, per style gallery, averaged over styles."""
        per_style = []
        for s in styles:
            imgs = [i for i in range(len(kept)) if style_of[i] == s]
            remap = {g: j for j, g in enumerate(imgs)}
            sel = [c for c in cap_sel if style_of[cap_img[c]] == s]
            if not sel:
                continue
            t2i = torch.tensor([remap[int(cap_img[c])] for c in sel])
            m = metrics.recall_at_k_from_embeddings(txt_emb[sel], img_emb[imgs], t2i)
            if same_base is not None:
                m["t2i_r1_base"] = _t2i_top1_same(txt_emb[sel], img_emb[imgs], t2i, same_base[imgs][:, imgs])
            per_style.append(m)
        return _mean(per_style)

    result = {**block(list(range(len(caps)))), "protocol": "per-style" if len(styles) > 1 else "standard",
              "n_images": len(kept), "n_texts": len(caps)}
    if len(styles) > 1:
        result["styles"] = styles
    for lg in sorted(set(cap_lang) - {""}):
        if len(set(cap_lang)) > 1:
            sel = [c for c in range(len(caps)) if cap_lang[c] == lg]
            result[lg] = {**block(sel), "unk_rate": round(tokenizer.unk_rate([caps[c][0] for c in sel]), 4)}
    if by:
        value = [group_of(r, by) for r in kept]
        if not any(value):
            raise ValueError(f"no evaluated image has a {by!r} value to group by (use 'tag' or a field of the "
                             f"image records, e.g. {', '.join(sorted(kept[0].meta)) or 'none here'})")
        langs = sorted(set(cap_lang) - {""}) if len(set(cap_lang)) > 1 else [None]
        result[f"by_{by}"] = {
            v or "(none)": {lg or "all": {**{k: m[k] for k in ("t2i_r1", "t2i_r5", "t2i_r10")}, "n_texts": len(sel)}
                for lg in langs
                if (sel := [c for c in range(len(caps)) if value[cap_img[c]] == v and lg in (None, cap_lang[c])])
                and (m := block(sel))}
            for v in sorted(set(value))}
    if len(styles) > 1 and "hex" in kept[0].meta:
        q = [i for i in range(len(kept)) if style_of[i] == styles[0]]
        g = [i for i in range(len(kept)) if style_of[i] == styles[1]]
        pos = {kept[i].meta["hex"]: j for j, i in enumerate(g)}
        q = [i for i in q if kept[i].meta["hex"] in pos]
        if q:
            i2i = metrics.image_to_image(img_emb[q], img_emb[g], torch.tensor([pos[kept[i].meta["hex"]] for i in q]))
            result.update({k: v for k, v in i2i.items() if k.startswith("i2i_")})
            result["i2i_query_style"], result["i2i_gallery_style"] = styles[0], styles[1]
    if report.total():
        result["skipped"] = report.summary()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    model.train(was_training)
    return result


def format_table(result: dict) -> str:
    """A small text table: rows = all / each language (+ image->image)."""
    rows = [("all", result)] + [(k, v) for k, v in result.items() if isinstance(v, dict) and not k.startswith("by_")]
    cols = list(KEYS) + (["t2i_r1_base"] if "t2i_r1_base" in result else [])
    lines = [f"{'captions':<10}" + "".join(f"{c:>12}" for c in cols)]
    for name, m in rows:
        lines.append(f"{name:<10}" + "".join(f"{m.get(c, float('nan')):>12.2f}" for c in cols))
    if "i2i_r1" in result:
        lines.append(f"image->image ({result['i2i_query_style']} -> {result['i2i_gallery_style']}): "
                     f"R@1 {result['i2i_r1']:.2f}  R@5 {result['i2i_r5']:.2f}  R@10 {result['i2i_r10']:.2f}")
    for key in (k for k in result if k.startswith("by_")):
        langs = sorted({lg for groups in result[key].values() for lg in groups})
        lines.append(f"\ntext->image R@1 {key.replace('_', ' ')}" + "".join(f"{lg:>10}" for lg in langs) + "   captions")
        for group, m in result[key].items():
            lines.append(f"  {group[:28]:<28}" + "".join(f"{m[lg]['t2i_r1']:>10.2f}" if lg in m else f"{'-':>10}"
                                                   for lg in langs) + f"{sum(x['n_texts'] for x in m.values()):>10}")
    return "\n".join(lines)
