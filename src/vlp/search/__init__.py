"""Search: index a collection with a trained dual encoder (FAISS) and serve it (FastAPI + a web page).

`vlp.search.index` builds and loads index folders, `vlp.search.server` serves them. This module imports
nothing heavy, so `vlp --help` stays fast.
"""
KINDS = ("flat", "ivf", "hnsw")        # FAISS index kinds: exact inner product, inverted lists, HNSW graph


def check_rerank(rerank) -> None:
    """Refuse --rerank until a cross-encoder exists: a silent ignore would serve unreranked results."""
    if rerank is not None:
        raise ValueError(f"--rerank {rerank}: no cross-encoder architecture is available yet (it comes with "
                         f"the ImageBERT issue); serve without --rerank")
