"""Native ops (CPU kernels in csrc/, built as a DeepSpeed OpBuilder extension) registered with torch.library,
with the pure-PyTorch reference as fallback. See native.py for the FEWBIT_NATIVE policy."""

from .native import (  # noqa: F401
    encode_pack, native_available, native_state, quantize_pack, unpack_dequantize, unpack_scale,
)

__all__ = ["encode_pack", "unpack_scale", "quantize_pack", "unpack_dequantize", "native_available", "native_state"]
