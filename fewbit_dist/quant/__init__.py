"""Derivative quantization: optimal step tables (exact DP) and reference bit packing."""

from .packing import pack_codes, packed_nbytes, unpack_codes
from .tables import SMOOTH_FUNCTIONS, Table, error_of, table

__all__ = ["table", "Table", "error_of", "SMOOTH_FUNCTIONS", "pack_codes", "unpack_codes", "packed_nbytes"]
