"""Operator actions on stations (LP assignment, firmware update) and how they are refused."""

from __future__ import annotations

from enum import StrEnum


class ActionErrorKind(StrEnum):
    """Why an action did not happen; the HTTP API maps each to a status code."""

    BAD_REQUEST = "bad_request"  # the request itself is wrong (400)
    NOT_FOUND = "not_found"  # no such station (404)
    CONFLICT = "conflict"  # not now: charging, LP taken, configured (409)
    TOO_LARGE = "too_large"  # firmware image over the limit (413)
    FAILED = "failed"  # tried, and it did not work: timeout, no reconnect (502)


class ActionError(Exception):
    """An action that was refused or failed; the message says why, in one line."""

    def __init__(self, kind: ActionErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
