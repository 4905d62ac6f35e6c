"""The webhook destination: each batch is one signed JSON POST.

Body (UTF-8 JSON)::

    {"batch_id": "...", "sync": "...", "segment": "...", "destination": "...", "mode": "diff",
     "attempt": 1, "sent_at": "2025-01-01T00:00:00+00:00",
     "records": [{"action": "add", "profile_id": "...", "fields": {...}}, ...]}

Headers:

- `Idempotency-Key: <batch id>`, the same on every attempt of the batch: a receiver that already
  applied it answers 2xx and does nothing (the body's `sent_at` and `attempt` change between attempts);
- `X-Refinery-Timestamp: <unix seconds>`;
- `X-Refinery-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`. A receiver
  recomputes it over the raw body bytes, compares in constant time, and rejects timestamps more than
  a few minutes old (replays). `receiver.verify_signature()` does exactly that.

Answers: 2xx delivered; 408, 429 and 5xx, timeouts and connection errors are transient (a
`Retry-After` in seconds or as an HTTP date is passed on); any other 4xx, a redirect that would
drop the body (301/302/303) and an address the SSRF guard refuses are terminal. Neither the secret
nor any record field is ever logged or put in an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson
from pydantic import BaseModel, Field, SecretStr, field_validator

from refinery.activation.destination import (
    Batch,
    DestinationContext,
    DestinationType,
    TerminalDeliveryError,
    TransientDeliveryError,
    register,
)
from refinery.activation.netguard import NetworkGuard, guarded_client, redact_url, send
from refinery.errors import ConfigurationError

SIGNATURE_HEADER = "X-Refinery-Signature"
TIMESTAMP_HEADER = "X-Refinery-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
TRANSIENT_STATUSES = frozenset({408, 425, 429})


class WebhookConfig(BaseModel):
    """Configuration of a webhook destination."""

    model_config = {"extra": "forbid"}

    url: str = Field(
        description="Where batches are POSTed (http or https). Loopback, private, link-local and cloud-metadata "
        "addresses are refused unless listed in the setting activation_allowed_networks."
    )
    secret: SecretStr = Field(
        min_length=16,
        description="Signing secret (at least 16 characters): each request carries X-Refinery-Signature = "
        "sha256=HMAC-SHA256(secret, timestamp + '.' + body). Stored encrypted, never shown.",
    )
    timeout_seconds: float | None = Field(
        None, gt=0, le=300, description="Timeout of one request; default: the setting activation_timeout_seconds."
    )

    @field_validator("url")
    @classmethod
    def _url_form(cls, value: str) -> str:
        try:
            NetworkGuard(field="url").check_url(value)
        except ConfigurationError as exc:  # pydantic reports a ValueError against the field
            raise ValueError(str(exc)) from None
        return value


def sign(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """The X-Refinery-Signature value of `body` sent at `timestamp`."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def encode_batch(batch: Batch, sent_at: datetime) -> bytes:
    return orjson.dumps(
        {
            "batch_id": batch.id,
            "sync": batch.sync,
            "segment": batch.segment,
            "destination": batch.destination,
            "mode": batch.mode,
            "attempt": batch.attempt,
            "sent_at": sent_at.isoformat(),
            "records": [{"action": r.action, "profile_id": r.profile_id, "fields": r.fields} for r in batch.records],
        },
        default=_json_default,
    )


def _json_default(value: Any) -> Any:
    """What orjson cannot write itself: a mapping that is not a dict (a record's fields may be any
    Mapping) as an object, anything else as its text."""
    if isinstance(value, Mapping):
        return dict(value)
    return str(value)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class WebhookDestination:
    def __init__(self, config: WebhookConfig, context: DestinationContext) -> None:
        self._url = config.url
        self._shown_url = redact_url(config.url)
        self._secret = config.secret
        self._guard = NetworkGuard(context.allowed_networks, field="url")
        self._client = guarded_client(
            self._guard,
            config.timeout_seconds or context.timeout_seconds,
            headers={"User-Agent": "refinery-activation", "Content-Type": "application/json"},
        )

    def deliver(self, batch: Batch) -> None:
        body = encode_batch(batch, datetime.now(UTC))
        timestamp = str(int(time.time()))
        headers = {
            IDEMPOTENCY_HEADER: batch.id,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._secret.get_secret_value(), timestamp, body),
        }
        request = self._client.build_request("POST", self._url, content=body, headers=headers)
        where = f"batch {batch.id} to {self._shown_url}"
        try:
            response = send(self._client, self._guard, request)
        except ConfigurationError as exc:  # a refused address, a bad redirect target, too many redirects
            raise TerminalDeliveryError(exc.message, field=exc.field, fix=exc.fix) from None
        except httpx.TimeoutException as exc:
            raise TransientDeliveryError(f"Timed out delivering {where} ({type(exc).__name__}).") from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise TransientDeliveryError(f"Connection failed delivering {where}: {exc}") from None
        except httpx.HTTPError as exc:
            raise TransientDeliveryError(f"HTTP error delivering {where}: {type(exc).__name__}: {exc}") from None
        self._classify(response, where)

    def _classify(self, response: httpx.Response, where: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        said = f"The receiver answered HTTP {status} {response.reason_phrase} to {where}."
        if status in TRANSIENT_STATUSES or status >= 500:
            raise TransientDeliveryError(said, retry_after=retry_after, status=status)
        if 300 <= status < 400:
            raise TerminalDeliveryError(
                said + " A redirect other than 307/308 would turn the POST into a GET and drop the batch.",
                field="url",
                fix="Set the destination's url to the address it redirects to.",
                status=status,
            )
        fixes = {
            401: "Check that the receiver and the destination share the same signing secret.",
            403: "Check that the receiver accepts requests from this Refinery.",
            404: "Check the destination's url.",
            413: "Lower the sync's batch_size.",
        }
        raise TerminalDeliveryError(
            said, fix=fixes.get(status, "Fix what the receiver refuses, then replay the dead letter."), status=status
        )

    def close(self) -> None:
        self._client.close()


WEBHOOK = register(
    DestinationType(
        kind="webhook",
        config_model=WebhookConfig,
        factory=WebhookDestination,
        description="POST each batch as signed JSON (HMAC-SHA256, Idempotency-Key) to an HTTP(S) endpoint.",
    )
)
