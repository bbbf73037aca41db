"""Fused ops: token saliency, span pooling, DSA structural loss (Triton on GPU, torch path on CPU)."""
