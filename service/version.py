"""Conveyor's installed version, and whether a server's version can serve this client."""

from __future__ import annotations

from conveyor.workers.release import conveyor_version

__all__ = ["conveyor_version", "incompatible", "major"]


def major(version_text: str) -> str:
    """The major part of a version: what must match between a client and its server."""
    return version_text.strip().split(".", 1)[0]


def incompatible(client: str, server: str) -> str | None:
    """Why a client of version ``client`` cannot use a server of version ``server``, or None."""
    if major(client) == major(server):
        return None
    return (
        f"the server runs Conveyor {server} and this client {client}: their major versions "
        f"differ, so their APIs may not agree; install conveyor {major(server)}.x here"
    )
