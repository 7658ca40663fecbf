"""Transport: link model (bandwidth, latency, loss), the communicator, and the local launcher."""

from astra.net.comm import AllGatherHandle, CommStats, Communicator, PeerFailure
from astra.net.launch import (
    WorkerFailure,
    free_port,
    init_from_env,
    rank0_logger,
    resolve_backend,
    spawn,
)
from astra.net.link import LinkConfig, LossModel, parse_bandwidth, parse_latency

__all__ = [
    "AllGatherHandle",
    "CommStats",
    "Communicator",
    "LinkConfig",
    "LossModel",
    "PeerFailure",
    "WorkerFailure",
    "free_port",
    "init_from_env",
    "parse_bandwidth",
    "parse_latency",
    "rank0_logger",
    "resolve_backend",
    "spawn",
]
