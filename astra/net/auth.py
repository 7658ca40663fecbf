"""Peers prove they hold the group's shared secret before any work (an HMAC challenge).

torch.distributed's own guidance is that its store and backends trust whoever connects, so it
must only run on a trusted network. Astra narrows that: local groups listen on loopback only
(astra.net.launch), and every member of a group, local or across machines, answers a challenge
right after the group forms:

1. every rank draws a 32-byte nonce and all-gathers it (with its host and pid, for messages);
2. every rank answers every other rank's nonce with HMAC-SHA256(secret, nonce_j | i | identity);
3. the answers are all-gathered and every rank checks the answers to its own nonce.

A rank that does not hold the secret cannot answer, and every rank refuses the group naming it.
Fresh nonces make a recorded answer useless in another group. What this does not protect: the
codes themselves travel unencrypted (add TLS or a VPN such as WireGuard between machines), and
anyone who can reach the rendezvous port can still disturb a rendezvous (deny service) even if
they cannot join it. Only tensors of bytes are exchanged here, never pickles.

Local groups get a fresh random secret from the parent process. Multi-machine runs (torchrun)
read it from ASTRA_SECRET_FILE (a file holding the token) or ASTRA_SECRET.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
from pathlib import Path

import torch
import torch.distributed as dist

SECRET_ENV = "ASTRA_SECRET"
SECRET_FILE_ENV = "ASTRA_SECRET_FILE"
_NONCE = 32
_IDENTITY = 96  # bytes of "host pid" carried with each nonce
_PROOF = 32


class AuthenticationError(RuntimeError):
    """A member of the group could not prove it holds the shared secret."""


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def secret_from_env() -> bytes:
    """The shared secret of a multi-machine group, or a one-line error saying how to set it."""
    path = os.environ.get(SECRET_FILE_ENV)
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise AuthenticationError(
                f"{SECRET_FILE_ENV}={path}: cannot read it ({exc.strerror})"
            ) from None
    else:
        token = os.environ.get(SECRET_ENV, "").strip()
    if len(token) < 16:
        raise AuthenticationError(
            f"a multi-machine group needs a shared secret of at least 16 characters on every "
            f"machine: set {SECRET_FILE_ENV} to a file holding one (make it with "
            f"`python -c 'import secrets; print(secrets.token_hex(32))' > astra.token`) or set "
            f"{SECRET_ENV}"
            + (f" (got {len(token)} characters)" if token else "")
        )
    return token.encode("utf-8")


def identity() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


def authenticate(group: dist.ProcessGroup, rank: int, world_size: int, secret: bytes) -> None:
    """Every rank proves it holds `secret`; raises AuthenticationError naming who could not.
    Collective: every rank of `group` calls it right after joining."""
    me = identity().encode("utf-8")[:_IDENTITY].ljust(_IDENTITY, b"\0")
    mine = torch.frombuffer(bytearray(secrets.token_bytes(_NONCE) + me), dtype=torch.uint8)
    offers = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(offers, mine, group=group)
    nonces = [bytes(o[:_NONCE].tolist()) for o in offers]
    names = [bytes(o[_NONCE:].tolist()).rstrip(b"\0").decode("utf-8", "replace") for o in offers]
    answers = b"".join(_proof(secret, nonces[j], rank, names[rank]) for j in range(world_size))
    answer = torch.frombuffer(bytearray(answers), dtype=torch.uint8)
    gathered = [torch.empty_like(answer) for _ in range(world_size)]
    dist.all_gather(gathered, answer, group=group)
    mine_nonce = nonces[rank]
    refused = [
        i
        for i in range(world_size)
        if not hmac.compare_digest(
            bytes(gathered[i][rank * _PROOF : (rank + 1) * _PROOF].tolist()),
            _proof(secret, mine_nonce, i, names[i]),
        )
    ]
    if refused:
        who = ", ".join(f"device {i} ({names[i]})" for i in refused)
        if len(refused) == world_size - 1 and world_size > 2:
            who = f"every other device ({who}); this device's secret differs from the group's"
        raise AuthenticationError(
            f"device {rank} refused the group: {who} did not prove it holds the shared secret "
            f"({SECRET_FILE_ENV} / {SECRET_ENV} must be the same on every machine)"
        )


def _proof(secret: bytes, nonce: bytes, rank: int, name: str) -> bytes:
    message = b"astra-auth/1|" + nonce + rank.to_bytes(4, "big") + name.encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).digest()
