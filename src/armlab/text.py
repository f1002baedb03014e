"""Words in messages: counts with the right plural, and "did you mean" for a mistyped name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 shard`, `2 shards`, `1,024 row groups` (`many` for irregular plurals: plural(n, "GPU"))."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def closest(word: str, options: Iterable[str]) -> str | None:
    """The option closest to a mistyped `word`, if any is close (difflib's ratio >= 0.6, about
    where Python's own "Did you mean" suggestions stop)."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """` (did you mean 'top-s0'?)` for the closest option, else ""."""
    match = closest(word, options)
    return f" (did you mean {match!r}?)" if match else ""
