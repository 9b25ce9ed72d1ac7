"""Encoders: each maps its input to `vlp.layers.Tokens` (x (B, N, D), mask (B, N) bool)."""
from vlp.encoders.cnn import TorchvisionTrunk
from vlp.encoders.patches import PatchEncoder
from vlp.encoders.text import TextEncoder, load_bert, save_bert

__all__ = ["PatchEncoder", "TextEncoder", "TorchvisionTrunk", "load_bert", "save_bert"]
