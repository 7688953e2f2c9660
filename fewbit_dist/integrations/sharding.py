"""Moved to fewbit_dist.models.sharding (convert's guard lives below convert); this name stays importable."""

from ..models.sharding import *  # noqa: F401,F403
from ..models.sharding import __all__  # noqa: F401
