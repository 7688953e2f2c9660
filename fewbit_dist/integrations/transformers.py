"""Moved to fewbit_dist.models.hf (what convert knows of Hugging Face models lives below convert); this name
stays importable."""

from ..models.hf import *  # noqa: F401,F403
from ..models.hf import __all__  # noqa: F401
