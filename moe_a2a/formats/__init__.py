"""Wire formats of tokens: LogFMT (10-bit log-domain combine payload) and NVFP4 (4-bit dispatch payload).

FP8 e4m3 with per-128-channel scales lives in ``moe_a2a.fp8`` (the dispatch kernels share it).
"""
from .logfmt import logfmt_decode, logfmt_encode
from .nvfp4 import nvfp4_dequantize, nvfp4_quantize

__all__ = ["logfmt_encode", "logfmt_decode", "nvfp4_quantize", "nvfp4_dequantize"]
