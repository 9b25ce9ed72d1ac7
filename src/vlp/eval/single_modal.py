"""Retrieval with a hybrid model's single-modal embeddings: one InterBERT used as a dual encoder.

A caption alone runs through the shared and text-only layers (`model.encode_text`), an image's regions
alone through the shared and image-only layers (`model.encode_image`); each gives one vector, so a test
set is embedded once and ranked by dot products, as a dual encoder is (`vlp.metrics`). Two scores:
- cosine of the L2-normalised pooled vectors (what an index would store);
- "itm_weighted": the ITM head's own form on the two single-modal vectors, w . (t * v) = (t * w) . v,
  a diagonal bilinear score (the bias does not change a ranking). ITM trains w on jointly encoded
  states, so this is the closest thing to what pretraining asked of the pooled vectors.
Neither is trained for: MSM, MRM and ITM never compare a caption encoded alone with an image encoded
alone, so expect far less than ITM and read the figures as what the extraction module gives for free.

    res = single_modal_recall(model, tokenizer, records, RegionStore("data/scenes/regions"), max_len=40)
"""
from __future__ import annotations

import time

import torch

from vlp.metrics import recall_at_k_from_embeddings


@torch.no_grad()
def embed_single_modal(model, tokenizer, captions: list[str], image_ids: list[str], store, max_len: int,
                       batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """-> pooled text (T, D) and pooled image (I, D), not normalised (`encode_text` / `encode_image`)."""
    from vlp.eval.rerank import _region_tensors
    model.eval()
    device = next(model.parameters()).device
    texts = []
    for a in range(0, len(captions), batch_size):
        ids, mask = tokenizer.encode(captions[a:a + batch_size], max_len)
        texts.append(model.encode_text(ids.to(device), mask.to(device), normalize=False).float().cpu())
    images = []
    for a in range(0, len(image_ids), batch_size):
        feats, boxes, rmask = (x.to(device) for x in _region_tensors(store, image_ids[a:a + batch_size]))
        images.append(model.encode_image(feats, boxes, rmask, normalize=False).float().cpu())
    return torch.cat(texts), torch.cat(images)


@torch.no_grad()
def single_modal_recall(model, tokenizer, records: list, store, max_len: int, limit: int | None = None,
                        batch_size: int = 256) -> dict:
    """Recall both ways of the single-modal embeddings over the records with captions and regions in the
    store (the first `limit` images with captions, as `eval.rerank.evaluate_cross_encoder` takes them):
    the usual recall keys for the cosine, and the same keys under "itm_weighted"."""
    t0 = time.perf_counter()
    kept = [r for r in [r for r in records if r.captions][:limit] if r.image_id in store]
    if not kept:
        raise ValueError("no evaluated record has regions in the store and a caption")
    caps = [(c, i) for i, r in enumerate(kept) for c in r.captions]
    t, v = embed_single_modal(model, tokenizer, [c for c, _ in caps], [r.image_id for r in kept], store, max_len,
                              batch_size)
    t2i = torch.tensor([i for _, i in caps])
    res = recall_at_k_from_embeddings(torch.nn.functional.normalize(t, dim=-1),
                                      torch.nn.functional.normalize(v, dim=-1), t2i)
    res["itm_weighted"] = recall_at_k_from_embeddings(t * model.itm.weight[0].float().cpu(), v, t2i)
    res.update(mode="single_modal", seconds=round(time.perf_counter() - t0, 2))
    return res
