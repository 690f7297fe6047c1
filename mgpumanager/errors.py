"""The broker's own errors, each knowing its HTTP status and contract code.

Everything the broker refuses or fails on is one of these; the web layer turns
any of them into ``{"error": {"code", "message", ...}}`` with ``status``.
"""

from __future__ import annotations


class BrokerError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, consumer: str | None = None,
                 kind: str | None = None, retry_after: int | None = None,
                 **details):
        super().__init__(message)
        self.message = message
        self.consumer = consumer
        self.kind = kind
        self.retry_after = retry_after
        self.details = details

    def to_json(self) -> dict:
        body = {"code": self.code, "message": self.message}
        if self.consumer is not None:
            body["consumer"] = self.consumer
        if self.kind is not None:
            body["kind"] = self.kind
        body.update(self.details)
        return {"error": body}

    @property
    def retry_may_help(self) -> bool:
        """False for refusals that the same request, sent again, meets again."""
        return self.code not in NOT_RETRIED

    def to_openai_json(self) -> dict:
        """OpenAI's error shape, with the broker's code: the openai SDK raises
        the status's exception (NotFoundError, InternalServerError, ...) with
        ``.code``, ``.type`` and ``.param`` from here and this message in its
        text."""
        if self.status == 401:
            kind = "authentication_error"
        elif self.status == 403:
            kind = "permission_error"
        elif self.status < 500:
            kind = "invalid_request_error"
        else:
            kind = "server_error"
        body = {"message": self.message, "type": kind, "param": self.details.get("param"),
                "code": self.code}
        if self.consumer is not None:
            body["consumer"] = self.consumer
        return {"error": body}


NOT_RETRIED = frozenset({"insufficient_vram", "model_not_found", "bad_request",
                         "payload_too_large", "unauthorized", "forbidden", "unknown_consumer"})


class BadRequest(BrokerError):
    status, code = 400, "bad_request"


class UnknownKind(BrokerError):
    status, code = 404, "unknown_kind"


class UnknownConsumer(BrokerError):
    status, code = 404, "unknown_consumer"


class ModelNotFound(BrokerError):
    status, code = 404, "model_not_found"


class NotFound(BrokerError):
    status, code = 404, "not_found"


class MethodNotAllowed(BrokerError):
    status, code = 405, "method_not_allowed"


class ConsumerUnhealthy(BrokerError):
    status, code = 503, "consumer_unhealthy"


class QueueFull(BrokerError):
    status, code = 503, "queue_full"


class TooManyStreams(BrokerError):
    """Every thread non-GPU passthrough may use is streaming already."""
    status, code = 503, "too_many_streams"


class QueueTimeout(BrokerError):
    status, code = 503, "queue_timeout"


class ShuttingDown(BrokerError):
    """The broker is stopping and this queued job cannot run before it does."""
    status, code = 503, "shutting_down"


class ConsumerCoolingDown(BrokerError):
    """Its loads kept failing: refused until the cooldown ends."""
    status, code = 503, "consumer_cooling_down"


class Forbidden(BrokerError):
    status, code = 403, "forbidden"


class Unauthorized(BrokerError):
    status, code = 401, "unauthorized"


class InsufficientVram(BrokerError):
    status, code = 503, "insufficient_vram"


class UnloadFailed(BrokerError):
    """An explicit unload the consumer's own route did not carry out."""
    status, code = 502, "unload_failed"


class UpstreamUnreachable(BrokerError):
    status, code = 502, "upstream_unreachable"


class UpstreamTimeout(BrokerError):
    status, code = 504, "upstream_timeout"


class UpstreamBadResponse(BrokerError):
    """The consumer answered, but with something that cannot be forwarded."""
    status, code = 502, "upstream_bad_response"


class PayloadTooLarge(BrokerError):
    status, code = 413, "payload_too_large"


class RequestTimeout(BrokerError):
    status, code = 408, "request_timeout"


class Abandoned(BrokerError):
    """The client went away while its job waited; nobody reads this answer."""
    status, code = 499, "client_gone"


class ConfigError(Exception):
    """Every problem found in one config file, each as ``file: key.path: ...``."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = [f"{path}: {p}" for p in problems]
        lines = "\n".join(self.problems)
        super().__init__(f"{path}: {len(self.problems)} problem(s) in the config:\n{lines}")
