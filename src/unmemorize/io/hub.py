"""The Hugging Face Hub, when a source names it (hf:NAME, a hub model id): reached at once, or not at all.

Left to itself, the hub client retries an unreachable hub for about 25 seconds per file, logging every retry,
before the load fails. Instead, one quick connection attempt (a few seconds at most) decides: when the hub
(or the proxy in front of it) cannot be reached, the load runs in the hub client's offline mode, so a copy in
the local cache still loads and a missing one fails at once, and the caller says so in one line.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from .notes import note

CONNECT_TIMEOUT_S = 3.0

# Loggers muted while a load may talk to the hub: the client's retry lines, the "using the cached version"
# warnings of datasets (a note says it once instead).
QUIET_LOGGERS = ("huggingface_hub", "datasets")

_reachable: dict[tuple[str, int], bool] = {}


@dataclass(frozen=True)
class HubAccess:
    """How a load may use the hub: `offline` when the user asked for it or the hub cannot be reached."""

    host: str
    offline: bool
    unreachable: bool  # offline because the connection attempt failed (not because the user asked)

    def reason(self) -> str:
        """Why a load that needed the hub failed, when it failed for want of the hub."""
        if self.unreachable:
            return f"the Hugging Face Hub ({self.host}) cannot be reached and no copy is in the local cache"
        return "offline mode is on (HF_HUB_OFFLINE) and no copy is in the local cache"


def endpoint() -> tuple[str, str, int]:
    """(hub host, host to connect to, its port): the proxy's when one is configured for the hub's address."""
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            return host, parsed.hostname, parsed.port or (1080 if parsed.scheme.startswith("socks") else 80)
    return host, host, port


def reachable(address: tuple[str, int], timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `address` opens within `timeout` seconds (name lookup included); asked once
    per process and address."""
    if address not in _reachable:
        outcome: list[bool] = []

        def attempt() -> None:
            try:
                with socket.create_connection(address, timeout=timeout):
                    outcome.append(True)
            except OSError:
                outcome.append(False)

        # In a thread: a name lookup that hangs has no timeout of its own.
        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        thread.join(timeout)
        _reachable[address] = bool(outcome and outcome[0])
    return _reachable[address]


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def hub_access(source: str) -> Iterator[HubAccess]:
    """Around a load of `source` from the hub: the hub client's retry logs muted and, when the hub cannot be
    reached, its offline mode on (a cached copy loads; say so once)."""
    host, connect_host, port = endpoint()
    offline = is_offline()
    unreachable = not offline and not reachable((connect_host, port))
    access = HubAccess(host, offline or unreachable, unreachable)
    with _quiet(), (_offline_mode() if unreachable else contextlib.nullcontext()):
        yield access
    if unreachable:  # only reached when the load succeeded: it came from the cache
        note(f"the Hugging Face Hub ({host}) cannot be reached; {source} was loaded from the local cache")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """The hub client's offline mode (HF_HUB_OFFLINE) for the duration: no request is made; the caches answer.

    huggingface_hub (and transformers through it) reads the flag at every request; datasets keeps its own copy.
    """
    from huggingface_hub import constants

    flags: list[tuple[object, str]] = [(constants, "HF_HUB_OFFLINE")]
    try:
        import datasets.config

        flags += [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE")]
    except ImportError:  # datasets is only needed for hf: sets and corpora
        pass
    saved = [(owner, name, getattr(owner, name)) for owner, name in flags if hasattr(owner, name)]
    for owner, name, _ in saved:
        setattr(owner, name, True)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
