"""Speculative decoding for vLLM with diffusion-LM drafters."""

__version__ = "0.1.0"
