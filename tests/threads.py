"""What the kernel says of a process's threads."""

from __future__ import annotations

from pathlib import Path


def pinned_threads(pid: int) -> list[str]:
    """The CPU lists of a process's threads that may run on one CPU only."""
    lists = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                cpus = line.split(":", 1)[1].strip()
                if cpus.isdigit():
                    lists.append(cpus)
    return lists
