"""Search: index a collection with a trained dual encoder (FAISS) and serve it (FastAPI + a web page).

`vlp.search.index` builds and loads index folders, `vlp.search.server` serves them. This module imports
nothing heavy, so `vlp --help` stays fast.
"""
KINDS = ("flat", "ivf", "hnsw")        # FAISS index kinds: exact inner product, inverted lists, HNSW graph


def check_rerank(rerank) -> None:
    """Refuse --rerank: the service cannot rerank yet, and a silent ignore would serve unreranked results."""
    if rerank is not None:
        raise ValueError(f"--rerank {rerank}: the search service does not rerank yet (an index holds no region "
                         f"features for a cross-encoder); serve without --rerank, and measure ImageBERT reranking "
                         f"with `vlp evaluate RUN --regions STORE --first-stage DUAL`")
