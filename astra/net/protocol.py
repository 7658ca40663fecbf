"""The communicator protocol: what maths and runtime code may ask of the network.

Two classes implement it: `astra.net.comm.Communicator` (real processes over torch.distributed)
and `astra.net.lockstep.LockstepComm` (the composed mode: N devices on fewer cores, virtual
clocks). Both emulate the same link with one `astra.net.link.Uplink` each. Code that receives a
communicator types it as `Comm` and never imports torch.distributed.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from astra.net.comm import CommStats
from astra.net.link import LinkConfig


class GatherHandle(Protocol):
    def wait(self) -> list[torch.Tensor]: ...


@runtime_checkable
class Comm(Protocol):
    rank: int
    world_size: int
    stats: CommStats  # bytes, messages, comm / wait time, per phase
    link: LinkConfig  # the emulated link of the next messages (settable: a bandwidth trace)

    def start_all_gather_bytes(self, payload: torch.Tensor) -> GatherHandle:
        """Start an all-gather of a 1-D uint8 payload; compute before wait() hides the link."""
        ...

    def all_gather_bytes(self, payload: torch.Tensor) -> list[torch.Tensor]: ...

    def all_gather_tensor(self, x: torch.Tensor, dim: int = 0) -> list[torch.Tensor]: ...

    def all_reduce_tensor(self, x: torch.Tensor) -> torch.Tensor: ...

    def send_tensor(self, x: torch.Tensor, dst: int) -> None:
        """Queue x for rank dst and return at once (delivered by wait_sends at the latest)."""
        ...

    def recv_tensor(self, src: int) -> torch.Tensor: ...

    def expect(self, src: int) -> object:
        """Post the receive for src's next message ahead of recv_tensor (a transport hint)."""
        ...

    def wait_sends(self) -> None: ...

    def barrier(self) -> None: ...

    def now(self) -> float:
        """This rank's clock in seconds: wall time, or virtual time in the composed mode."""
        ...
