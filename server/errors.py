"""The service's error hierarchy. Each error carries its gRPC status and its
stable ErrorInfo reason; `interceptor.py` turns them into statuses in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc

DOMAIN = "observatory.v1"
# What an error may carry (the contract: a message of at most 1 KiB that never
# echoes more than 200 characters of any input; all trailers under 8 KiB).
# Call sites quote input through `quote`; the interceptor enforces the rest.
MAX_ECHO_CHARS = 200
QUOTE_CHARS = 64


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """`value` as an error message quotes a client's input: repr'd, and cut
    to `limit` characters (marked with an ellipsis) when longer."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        return repr(text[:limit]) + "…"
    return repr(text)


class ObservatoryError(Exception):
    """An expected failure that a client can act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations)


class InvalidArgument(ObservatoryError):
    """Bad input. Always names the offending field path."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_FIELD"

    def __init__(self, field: str, description: str, *, reason: str | None = None) -> None:
        super().__init__(
            f"{field}: {description}" if field else description,
            reason=reason,
            field_violations=[(field, description)],
        )
        self.field = field


class RequestIdReused(InvalidArgument):
    reason = "REQUEST_ID_REUSED"

    def __init__(self) -> None:
        super().__init__("request_id", "this request_id was already used with a different payload")


class Unauthenticated(ObservatoryError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(ObservatoryError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class NotFound(ObservatoryError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(ObservatoryError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(ObservatoryError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Aborted(ObservatoryError):
    code = grpc.StatusCode.ABORTED
    reason = "ABORTED"


class Unavailable(ObservatoryError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "DATABASE_UNAVAILABLE"


class DeadlineExceeded(ObservatoryError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class LimitExceeded(ObservatoryError):
    """A server limit was reached (e.g. concurrent streams of one caller):
    refused at once, naming the limit's setting and its value."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "LIMIT_EXCEEDED"

    def __init__(self, message: str, *, limit: str, maximum: float) -> None:
        super().__init__(message, metadata={"limit": limit, "max": f"{maximum:g}"})
