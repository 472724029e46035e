"""Quantized weights as module swaps: packed GGUF blocks executed packed, weight-only int8/int4."""
