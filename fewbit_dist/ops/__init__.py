"""Native ops (CPU kernels in csrc/, built as a DeepSpeed OpBuilder extension) registered with torch.library,
with the pure-PyTorch reference as fallback. See native.py for the FEWBIT_NATIVE policy."""

from .native import encode_pack, native_available, native_state, unpack_scale  # noqa: F401

__all__ = ["encode_pack", "unpack_scale", "native_available", "native_state"]
