"""Files a run writes: one atomic write for every file fedapp keeps (results, checkpoints,
client state, DP ledgers, credentials).

A new file with a random name beside the target, made with its final mode (`O_EXCL`, so an
existing file's wider mode is never reused and a private key is never readable by others),
then renamed over the target: a crash leaves the previous file whole, and a reader never sees
half of one. `durable` also syncs it to disk before the rename (keys and ledgers: losing one
on a power cut is worse than the few milliseconds).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PRIVATE = 0o600
PUBLIC = 0o644


def write_atomic(
    path: Path | str, data: bytes | str, mode: int = PUBLIC, durable: bool = False
) -> None:
    """Replace `path` by `data` (text is written as UTF-8) atomically, with exactly `mode`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_exclusive(path: Path | str, data: bytes, mode: int = PRIVATE) -> bool:
    """Write `path` with `mode` from its creation, synced, and never over an existing file:
    False if it exists (another process won the race; its file is kept)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails where the file exists
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)
