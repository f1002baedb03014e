"""Words in messages: counts with the right plural, and "did you mean" for a mistyped name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 shard`, `2 shards`, `1,024 row groups` (`many` for irregular plurals: plural(n, "GPU"))."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """` (did you mean 'rows_per_shard'?)` for the closest option, else "" (difflib's ratio >= 0.6,
    the cut-off Python's own NameError suggestions are close to)."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
