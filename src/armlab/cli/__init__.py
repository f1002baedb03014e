"""armlab's command line: a thin shell over the Python API.

Each command module (one per area, named for it) registers its commands on `app`. `main` maps
`ArmlabError` (bad input, refused safety check) to one line on stderr and exit 2, and
`RunFailed` to exit 1; user mistakes never print a traceback.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import typer

from armlab.cli.app import Interrupted, app, with_typed_exp
from armlab.errors import ArmlabError, RunFailed, Stopped

# Command modules: importing them registers their commands on `app`, in workflow order
# (the order `armlab --help` lists them).
from armlab.cli import init, data, train, report, blob, remote  # noqa: E402,F401  isort: skip

# errno values that mean "the user's filesystem said no" (not an armlab bug): one line, exit 2.
# ENOTDIR/EEXIST: a file sits where armlab needs a directory (a workdir path that is a file).
_USER_OS_ERRORS = {
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST,
}  # fmt: skip
_FIXES = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space",
    errno.ENOTDIR: "a file is in the way of a directory: move it",
    errno.EEXIST: "a file is in the way of a directory: move it",
}

INTERRUPTED = "armlab: interrupted; rerun the same command to resume"


def main() -> None:
    try:
        _main()
    except KeyboardInterrupt:  # Ctrl-C outside a command (while parsing, or while printing an error)
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)


def _main() -> None:
    try:
        # standalone_mode=False: usage errors reach us as exceptions, so they print as one line like
        # every other bad input instead of typer's multi-line box.
        rc = app(standalone_mode=False, prog_name="armlab")
        sys.exit(rc if isinstance(rc, int) else 0)
    except typer.Abort:
        print("armlab: aborted", file=sys.stderr)
        sys.exit(1)
    except typer.TyperException as e:  # click's usage errors: unknown flag, bad value, missing argument
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `armlab`: typer has printed the help already
            sys.exit(2)
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print(f"armlab: error: {e.format_message().rstrip('.')}{hint}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno not in _USER_OS_ERRORS:
            raise
        where = Path(e.filename) if e.filename else None
        if where is not None and where.name.startswith(".") and where.suffix == ".tmp":
            where = where.parent  # an atomic write's temp file: the dir is what is not writable
        where = f"{where}: " if where else ""
        fix = _FIXES.get(e.errno, "make it writable")
        print(
            f"armlab: error: {where}{e.strerror}; {fix} (or set 'workdir' / --out elsewhere)", file=sys.stderr
        )
        sys.exit(2)
    except ArmlabError as e:
        print(f"armlab: error: {with_typed_exp(str(e))}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:  # raised below typer, which would turn a KeyboardInterrupt into a silent 130
        print(f"armlab: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except RunFailed as e:
        print(f"armlab: failed: {with_typed_exp(str(e))}", file=sys.stderr)
        sys.exit(1)
    except (Interrupted, KeyboardInterrupt):
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
