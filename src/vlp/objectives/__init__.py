"""Objectives: modules with forward(output, batch) -> scalar loss; their weights live in the config.

One small module per family (contrastive.py, masked_lm.py, masked_region.py, matching.py), each citing
the paper section it implements. Which objectives a system has, and how they are built from the
`[objectives]` weights, is said in its module: `vlp.systems.<name>.OBJECTIVES` and `build_objectives`.
"""
