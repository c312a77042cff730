"""Settings files read with pydantic: the strict base model, and its errors as one ``FILE: where: message`` line.
No Ray and no I/O here."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from raypets.errors import UserError


class Model(BaseModel):
    """A section of a settings file: only the keys raypets reads; values checked, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def invalid(message: str) -> PydanticCustomError:
    """A validator's error whose message names its own place (:func:`user_error` prints it as it is)."""
    return PydanticCustomError("raypets", "{message}", {"message": message})


def user_error(path: Path, error: ValidationError, within: str = "") -> UserError:
    """pydantic's first error as one line, ``FILE: where: message``; ``within``: where the validated object lies."""
    first = error.errors(include_url=False)[0]
    if first["type"] == "raypets":
        return UserError(f"{path}: {first['msg']}")
    where = ".".join(str(part) for part in (within, *first["loc"]) if part != "")
    return UserError(f"{path}: {where}: {_problem(first)}" if where else f"{path}: {_problem(first)}")


_TAKES = {"int": "a whole number", "float": "a number", "bool": "true or false", "string": "text", "dict": "a mapping",
          "model": "a mapping", "list": "a list", "tuple": "a list", "path": "a path"}
_SAYS = {"missing": "missing", "extra_forbidden": "unknown key"}


def _problem(error: dict) -> str:
    """A short message for one of pydantic's errors: ``takes a whole number, got 'x'``, ``missing``, ..."""
    kind, _, problem = error["type"].partition("_")
    if kind in _TAKES and problem in ("type", "parsing", "from_float"):
        return f"takes {_TAKES[kind]}, got {error['input']!r}"
    if error["type"] == "literal_error":
        return f"takes {error['ctx']['expected']}, got {error['input']!r}"
    if error["type"] in _SAYS:
        return _SAYS[error["type"]]
    return f"{error['msg'][0].lower()}{error['msg'][1:]}, got {error['input']!r}"
