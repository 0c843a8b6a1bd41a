"""Credentials inside URLs and messages: find them, keep them apart, never show them.

A LoRA URL can carry a secret: a `?token=` query, a presigned signature (`X-Amz-Signature`,
`X-Goog-Signature`, CloudFront's `Signature`/`Policy`/`Key-Pair-Id`), or `user:password@` in
the host part. Such parts decide who may be served a cached copy (see `cache.py`), and they
are never shown: a URL is displayed without its query or user info, and any message from the
HTTP stack is scrubbed before it reaches a log or a user.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

CREDENTIAL_QUERY_KEYS = frozenset(
    {
        "token",
        "access_token",
        "api_key",
        "apikey",
        "key",
        "sig",
        "signature",
        "expires",
        "policy",
        "key-pair-id",
        "auth",
        "password",
    }
)
CREDENTIAL_QUERY_PREFIXES = ("x-amz-", "x-goog-")

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_QUERY = re.compile(r"(?<=[^\s?])\?[^\s'\"<>]*=[^\s'\"<>]*")
# Loggers of the HTTP stack: their records can quote a request line or URL with its query.
_HTTP_LOGGERS = ("urllib3", "requests", "httpx2", "httpcore2", "huggingface_hub")
_BEARER = re.compile(r"(?i)\b(bearer|token)\s+[A-Za-z0-9._~+/=-]{8,}")


def is_credential_key(key: str) -> bool:
    key = key.lower()
    return key in CREDENTIAL_QUERY_KEYS or key.startswith(CREDENTIAL_QUERY_PREFIXES)


def split_credentials(url: str) -> tuple[str, str]:
    """(the URL without its credential parts, those parts as one canonical string or "").

    The first is a stable identity for the file (a cache key); the second is what proves a
    caller's access, compared only through a keyed hash.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    public = [(k, v) for k, v in query if not is_credential_key(k)]
    secret = sorted((k.lower(), v) for k, v in query if is_credential_key(k))
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0] if len(netloc) == 2 else ""
    host = netloc[-1]
    material = "&".join(f"{k}={v}" for k, v in secret)
    if userinfo:
        material = f"userinfo={userinfo}&{material}"
    return urlunsplit((parts.scheme, host, parts.path, urlencode(public), "")), material


def display_url(url: str) -> str:
    """The URL as it may be shown anywhere: no user info, no query, no fragment."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def scrub(text: str, secrets: Iterable[str | None] = ()) -> str:
    """A message with every URL shown by `display_url`, query strings, bearer tokens and the
    given secret values removed: for text that comes from requests, urllib3, httpx or the hub."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _URL.sub(lambda m: display_url(m.group(0)), text)
    text = _QUERY.sub("", text)
    return _BEARER.sub(lambda m: m.group(1) + " ***", text)


def scrub_http_logs() -> None:
    """Pass every log record of the HTTP stack through `scrub`, whatever its level and handler.

    A logger filter would miss child loggers (urllib3.connectionpool logs each request line at
    DEBUG), so the record factory does it, once per process.
    """
    previous = logging.getLogRecordFactory()
    if getattr(previous, "scrubs_http", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.name.startswith(_HTTP_LOGGERS):
            record.msg, record.args = scrub(record.getMessage()), ()
        return record

    factory.scrubs_http = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
