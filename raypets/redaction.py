"""Hiding the keys a user typed into a URI (``s3://KEY:SECRET@bucket/...``) from everything printed or saved."""

from __future__ import annotations

import re

_USER_INFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]+@")
HIDDEN = "***"  # what stands in a printed or saved URI for its keys


def redact(value: object) -> object:
    """``value`` with the keys of every URI in it hidden (``s3://***@bucket/...``): a string, or a dict, list or
    tuple of them (other values as they are). What is printed or saved."""
    if isinstance(value, str):
        return _USER_INFO.sub(rf"\g<scheme>{HIDDEN}@", value)
    if isinstance(value, dict):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(item) for item in value)
    return value
