"""Typed records: dataclasses that are written as JSON and read back (files, host messages).

`Record` gives a dataclass `to_json()` (plain JSON data) and `from_json(data, source)` (checked
against the field types, nested records, tuples and optionals included), through pydantic's
`TypeAdapter`, so a record is one definition and never a dict read by string keys. A document
that does not fit is one ArmlabError line naming its source (a file, a host), never a KeyError
deep in a caller.
"""

from __future__ import annotations

import functools
from typing import Any, Self

from pydantic import TypeAdapter, ValidationError

from armlab.errors import ArmlabError


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


class Record:
    """Mixin for a (frozen) dataclass: `to_json` / `from_json`."""

    def to_json(self) -> dict[str, Any]:
        return _adapter(type(self)).dump_python(self, mode="json")

    @classmethod
    def from_json(cls, data: Any, source: str = "record") -> Self:
        try:
            return _adapter(cls).validate_python(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "(top)"
            raise ArmlabError(f"{source}: not a valid {cls.__name__} ({where}: {err['msg']})") from None
