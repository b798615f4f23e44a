"""The server's socket: the address checked and bound before the model loads, so that a taken port fails in a
second, not after minutes of loading.
"""

from __future__ import annotations

import ipaddress
import socket

from pipeline.errors import UserError


class ServeError(UserError):
    """The server cannot start (the address is taken or unknown, ...)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (IPv4 or IPv6), or ServeError saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise ServeError(f"--host {host}: not an address this machine can listen on ({e.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror} (another server there? pick another "
                         "--port, or 0 for a free one)") from None
    sock.listen(2048)
    return sock
