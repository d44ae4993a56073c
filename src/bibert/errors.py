"""The one exception type users see: a message that names the problem and the fix."""
from __future__ import annotations

import os
import stat


class BibertError(Exception):
    """A user-facing error. The CLI prints its message and exits with status 2."""


def not_a_file(path: str | os.PathLike, what: str, folder_hint: str = "") -> BibertError:
    """The error for `path` when a regular file (`what`: "packed model", "input file") was
    expected there: it does not exist, or it is a folder (then `folder_hint` says what to do),
    a named pipe, a device, a socket."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        broken = " (a symbolic link to nothing)" if os.path.islink(path) else ""
        return BibertError(f"{what} {path} does not exist{broken}")
    except OSError as exc:
        return BibertError(f"cannot look at {what} {path} ({exc.strerror or exc})")
    if stat.S_ISDIR(mode):
        return BibertError(f"{what} {path} is a folder, not a file" + (f"; {folder_hint}" if folder_hint else ""))
    kinds = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return BibertError(f"{what} {path} is {kind}, not a file; give the path of a file on disk")
