"""Search: index a collection with a trained dual encoder (FAISS) and serve it (FastAPI + a web page).

`vlp.search.index` builds and loads index folders, `vlp.search.server` serves them. This module imports
nothing heavy, so `vlp --help` stays fast.
"""
KINDS = ("flat", "ivf", "hnsw")        # FAISS index kinds: exact inner product, inverted lists, HNSW graph
