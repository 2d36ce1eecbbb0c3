"""The exit codes of every Courier service (`python -m services.<name>`): one meaning each, the
same for the gateway and the consumers, so a supervisor or an operator can tell why a service
ended (README, Settings)."""

from __future__ import annotations

import logging
from enum import IntEnum

__all__ = ["ServiceExit", "log_refusal"]


class ServiceExit(IntEnum):
    OK = 0
    """Stopped when asked (SIGTERM, SIGINT)."""
    FAILED = 1
    """Could not do its work, for a supervisor to start it again: the broker away for too
    long, a store that cannot be opened at start, the gateway's port or a consumer's health
    port taken."""
    TOPOLOGY = 2
    """A queue declared with other arguments: an operator has to fix it first."""
    STORE_CLAIMED = 3
    """The store belongs to another deployment (`COURIER_NAMESPACE`)."""
    SETTINGS = 4
    """An invalid setting; stderr names each."""


_REFUSALS = {
    ServiceExit.TOPOLOGY: "topology mismatch; refusing to start",
    ServiceExit.STORE_CLAIMED: "the store belongs to another namespace; refusing to start",
}


def log_refusal(log: logging.Logger, code: ServiceExit, exc: BaseException) -> None:
    """Say why a service refuses to start, the same way in every service: the reason (which
    queue, which namespace) as a field, not only at the end of the traceback."""
    log.error(_REFUSALS[code], exc_info=exc, extra={"error": str(exc)})
