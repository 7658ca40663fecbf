"""A persistent device group: N workers that load a model once and serve many requests.

The library API that `astra run` and `astra serve` are thin layers over:

    from astra.group import Group, GroupConfig, LinkConfig, QuantConfig, Sampling
"""

from astra.group.config import GroupConfig, QuantConfig
from astra.group.group import (
    Chunk,
    Completion,
    Encoding,
    Group,
    GroupError,
    RequestError,
    Scoring,
)
from astra.group.records import RequestRecord
from astra.net.link import LinkConfig
from astra.sampling import Sampling

__all__ = [
    "Chunk",
    "Completion",
    "Encoding",
    "Group",
    "GroupConfig",
    "GroupError",
    "LinkConfig",
    "QuantConfig",
    "RequestError",
    "RequestRecord",
    "Sampling",
    "Scoring",
]
