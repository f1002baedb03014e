"""Names that become paths: one rule, checked in one place.

An experiment, arm, run, host, lane or scorer name becomes a directory or file name under the
workdir (`arms/<arm>/runs/<run>/`, `lanes/<host>.lane<k>.json`, ...). A name such as `../data`,
`..` or `a/b` would write outside the place it names (a run's checkpoints into its arm's shard
dir), so every name is checked where it enters (the spec's validators, the command-line flags)
and again where it becomes a path (`workdir.Workdir`), as a last line of defence.

The rule: a letter or digit first, then letters, digits, '.', '_' or '-', at most 100
characters. That excludes '/', '\\', '..' and '.' as whole names, hidden names, spaces and
anything a shell or a URL would need quoted.
"""

from __future__ import annotations

import re

from armlab.errors import ArmlabError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_NAME = 100  # well under a file name's 255 bytes, with room for suffixes (`.lane3.state.json`)
RULE = "letters, digits, '.', '_' or '-', starting with a letter or digit, at most 100 characters"


class BadName(ArmlabError, ValueError):
    """A name that cannot be a path component. A ValueError too, so a pydantic validator that
    raises it reports it as that key's error; elsewhere it is an ArmlabError (one line, exit 2)."""


def is_name(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_NAME and NAME_RE.match(value) is not None


def check_name(value: object, what: str) -> str:
    """`value` if it is a safe path component, else BadName naming `what` (e.g. "run name",
    "--run-name") and the rule."""
    if is_name(value):
        return value  # type: ignore[return-value]
    why = ""
    if isinstance(value, str) and ("/" in value or "\\" in value or value in (".", "..")):
        why = " (it would leave its directory)"
    elif isinstance(value, str) and len(value) > MAX_NAME:
        why = f" (it has {len(value)} characters)"
    raise BadName(f"{what} {value!r} is not a valid name{why}: use {RULE}")
