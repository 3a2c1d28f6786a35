"""Small file-writing helpers shared by the checkpoint manager, the run logger, the data cache and the
Hugging Face export: atomic replacement, and modes that follow the umask."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a crash leaves the old content or the new, never a mix."""
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give `path` and, for a folder, everything under it the modes a plain open()/mkdir() would:
    `tempfile.mkdtemp`/`mkstemp` and safetensors create private entries (0700 folders, 0600 files),
    which no one else on a shared cluster can read. The umask decides, as for every other file."""
    mask = current_umask()
    path = Path(path)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        if entry.is_symlink():
            continue
        full = 0o777 if entry.is_dir() or os.access(entry, os.X_OK) else 0o666
        os.chmod(entry, full & ~mask)
