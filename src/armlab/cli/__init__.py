"""armlab's command line: a thin shell over the Python API.

Each command module (one per area, named for it) registers its commands on `app`. `main` maps
`ArmlabError` (bad input, refused safety check) to one line on stderr and exit 2, and
`RunFailed` to exit 1; user mistakes never print a traceback.
"""

from __future__ import annotations

import sys

from armlab.cli.app import app
from armlab.errors import ArmlabError, RunFailed

# Command modules: importing them registers their commands on `app`, in workflow order
# (the order `armlab --help` lists them).
from armlab.cli import data, train, report, blob, remote  # noqa: E402,F401  isort: skip


@app.command()
def version() -> None:
    """Print armlab's version."""
    from armlab import __version__

    print(__version__)


def main() -> None:
    try:
        app()
    except ArmlabError as e:
        print(f"armlab: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as e:
        print(f"armlab: failed: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("armlab: interrupted (rerun the same command to resume)", file=sys.stderr)
        sys.exit(130)
