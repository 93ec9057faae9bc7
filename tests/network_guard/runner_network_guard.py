"""The test suite opens no network connection: outbound connections raise and are recorded.

tests/conftest.py installs the guard in the test process (an autouse fixture) and puts this folder
on the PYTHONPATH of the Python subprocesses the tests start (the command line, DDP workers, joblib
workers), where sitecustomize.py installs it and records to $RUNNER_TEST_NETWORK_LOG; the fixture
fails the test that tried. Unix sockets and loopback addresses (localhost, 127.0.0.0/8, ::1) are
allowed: mlflow servers and rendezvous run there. A host name is refused before it is resolved.
Connections made by C++ code (gloo, NCCL, c10d's TCPStore) do not pass through Python's socket
module and are not seen.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
from typing import Any, Callable


class NetworkBlocked(ConnectionRefusedError):
    """An OSError, so that the code under test takes its no-network path; the test still fails."""


def is_local(family: int, address: Any) -> bool:
    if family == getattr(socket, "AF_UNIX", None) or not isinstance(address, tuple) or not address:
        return True  # a socket file, or no IP address at all
    host = address[0].decode() if isinstance(address[0], bytes) else str(address[0])
    if host in ("", "localhost") or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False  # a host name: it would be resolved and reached
    return ip.is_loopback or ip.is_unspecified


def guarded(record: Callable[[str], None]) -> dict[tuple[Any, str], Any]:
    """(owner, attribute) -> the guarded replacement of socket's connect, connect_ex, create_connection."""
    connect, connect_ex, create_connection = socket.socket.connect, socket.socket.connect_ex, socket.create_connection

    def check(family: int, address: Any) -> None:
        if not is_local(family, address):
            record(repr(address))
            raise NetworkBlocked(f"the test suite opens no network connection (tried {address!r})")

    def guarded_connect(self: socket.socket, address: Any) -> None:
        check(self.family, address)
        return connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> int:
        check(self.family, address)
        return connect_ex(self, address)

    def guarded_create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        check(socket.AF_INET, address)
        return create_connection(address, *args, **kwargs)

    return {(socket.socket, "connect"): guarded_connect, (socket.socket, "connect_ex"): guarded_connect_ex,
            (socket, "create_connection"): guarded_create_connection}


def install_for_process(log: str) -> None:
    """In a subprocess: guard for good, each attempt a line of ``log``."""
    def record(address: str) -> None:
        with open(log, "a") as f:
            f.write(f"{address} (pid {os.getpid()}: {' '.join(sys.argv)})\n")

    for (owner, name), replacement in guarded(record).items():
        setattr(owner, name, replacement)
