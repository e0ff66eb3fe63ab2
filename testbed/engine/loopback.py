"""A single-node run needs no network: its rendezvous store and the ranks' gloo transport listen on
loopback only.

Found by attack (issue 23): ``TCPStore(..., is_master=True)`` listens on every interface
(``*:PORT``, IPv4 and IPv6), unauthenticated, so another host could read and set the rendezvous
keys mid-run. The launcher binds the socket itself to 127.0.0.1 and hands it to the store
(``master_listen_fd``); each rank sets ``GLOO_SOCKET_IFNAME`` to the loopback interface (unless
the user set it), so gloo's pair sockets do not follow the hostname to a public address.
Checked by ``tests/test_reliability_attacks.py::test_a_run_listens_on_loopback_only`` from
``/proc/net/tcp``.
"""
from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from typing import Any


def loopback_interface() -> str | None:
    """The name of the loopback network interface (``lo`` on Linux), from /sys; None if unknown."""
    iff_loopback = 0x8
    try:
        for name in sorted(os.listdir("/sys/class/net")):
            if int(Path(f"/sys/class/net/{name}/flags").read_text(), 16) & iff_loopback:
                return name
    except (OSError, ValueError):
        return None
    return None


def loopback_store(world_size: int, timeout_s: float) -> Any:
    """A TCPStore served on a socket bound to 127.0.0.1 (a free port). The store owns the socket
    from here on (it closes the descriptor when it is destroyed)."""
    import torch.distributed as dist

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(max(128, world_size + 1))
        port = listener.getsockname()[1]
    except BaseException:
        listener.close()
        raise
    fd = listener.detach()
    try:
        return dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=True, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise
