"""The one error every layer raises for bad input: it names the field at fault. The server maps it to
INVALID_ARGUMENT (server/errors.py); offline commands print it."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """Bad input. `field` names the request field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
