"""Which machine a process runs on, as far as sharing cores goes: servers that report the same
identity compute on the same CPU cores (containers on one host included) and must take turns."""

from __future__ import annotations

import functools
import hashlib
import platform
import socket
import uuid
from pathlib import Path


@functools.cache
def machine_id() -> str:
    """The running kernel's boot id where there is one (shared by every container on the host),
    else the machine id, else host name and hardware address; hashed, 16 hex digits."""
    for source in ("/proc/sys/kernel/random/boot_id", "/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(source).read_text().strip()
        except OSError:
            continue
        if text:
            return hashlib.sha256(f"{source}:{text}".encode()).hexdigest()[:16]
    fallback = f"{platform.node() or socket.gethostname()}:{uuid.getnode():012x}"
    return hashlib.sha256(fallback.encode()).hexdigest()[:16]
