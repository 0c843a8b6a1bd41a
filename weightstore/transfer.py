"""How bytes arrive: pget where it is installed (the Cog image), else one HTTP stream.

Both ways write into the path they are given (the cache's temporary file), enforce the same
size cap, and fail with a `WeightsError` whose message holds no URL query, header or token.
Connection errors, timeouts, truncated bodies and 5xx answers are retried with backoff; a 4xx
answer is final. The backoff is a deploy-time number (LORA_RETRY_BACKOFF_SECONDS); tests set it
to 0, so they never really wait.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import requests

from weightstore import config
from weightstore.errors import WeightsError
from weightstore.redact import scrub, scrub_http_logs

log = logging.getLogger(__name__)

T = TypeVar("T")
DOWNLOADERS = ("auto", "pget", "python")


@dataclass(frozen=True)
class Limits:
    """Bounds on one download; `from_env` takes the deployment's (weightstore/config.py)."""

    max_bytes: int = config.LORA_MAX_FILE_BYTES
    timeout: float = config.LORA_DOWNLOAD_TIMEOUT
    total_timeout: float = config.LORA_DOWNLOAD_TOTAL_TIMEOUT  # a whole pget run
    retries: int = config.DOWNLOAD_RETRIES
    backoff: float = config.DOWNLOAD_BACKOFF_SECONDS  # the first wait; it doubles each try

    @classmethod
    def from_env(cls) -> Limits:
        return cls(
            max_bytes=config.lora_max_file_bytes(),
            timeout=config.lora_download_timeout(),
            total_timeout=config.lora_download_total_timeout(),
            backoff=config.retry_backoff_seconds(),
        )


_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class Transient(Exception):
    """A failure worth another try: the message is already safe to show."""


class HttpStatusError(WeightsError):
    """A final HTTP answer that is not the file (4xx); `status` lets a host say more."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def describe(exc: BaseException) -> str:
    """A library exception as a short sentence for a user: what happened, no URL query or token."""
    if isinstance(exc, requests.Timeout):
        return "the host did not answer in time"
    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.MissingSchema):
        return "the URL is not valid"
    if isinstance(exc, requests.exceptions.InvalidSchema):
        return "the URL's scheme is not supported"
    if isinstance(exc, requests.exceptions.TooManyRedirects):
        return "the host redirected too many times"
    if isinstance(exc, requests.exceptions.SSLError):
        return "the host's TLS certificate could not be verified"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the connection broke during the transfer"
    if isinstance(exc, requests.ConnectionError):
        return "the host could not be reached"
    return scrub(f"{type(exc).__name__}: {exc}")[:300]


def retrying(name: str, attempt_once: Callable[[], T], limits: Limits, action: str = "download") -> T:
    """Call attempt_once until it succeeds; `Transient` and transient requests errors are retried,
    at most `limits.retries` tries in all, each retry logged, the wait doubling from `limits.backoff`."""
    retries = limits.retries
    for attempt in range(retries):
        try:
            return attempt_once()
        except (Transient, *_TRANSIENT) as exc:
            reason = str(exc) if isinstance(exc, Transient) else describe(exc)
            if attempt == retries - 1:
                raise WeightsError(
                    f"could not {action} {name} after {retries} tries: {reason}. Try again in a few minutes"
                ) from None
            delay = limits.backoff * 2**attempt
            log.info(
                "could not %s %s (%s); retrying in %.1fs (try %d of %d)",
                action,
                name,
                reason,
                delay,
                attempt + 2,
                retries,
            )
            time.sleep(delay)
        except requests.RequestException as exc:
            raise WeightsError(f"could not {action} {name}: {describe(exc)}") from None
    raise AssertionError("unreachable")


def http_error(status: int, name: str, service: str) -> HttpStatusError:
    """What a final HTTP status means for the user, naming the input that fixes it."""
    if status in (401, 403):
        token_input = {"CivitAI": "civitai_api_token", "Hugging Face": "hf_api_token"}.get(service)
        if token_input:
            return HttpStatusError(f"{name} needs a {service} token: pass {token_input} (got HTTP {status})", status)
        return HttpStatusError(
            f"{name} refused access (HTTP {status}): the URL needs a valid credential (a signed URL or its "
            "token), or it is wrong",
            status,
        )
    if status == 404:
        return HttpStatusError(f"{name} was not found (HTTP 404): check the URL or id", status)
    return HttpStatusError(f"{name}: HTTP {status} from {service}", status)


class Downloader:
    """Moves the bytes of one URL into one file. `tool` is auto (pget when on PATH), pget or python."""

    def __init__(self, tool: str = "auto", limits: Limits | None = None) -> None:
        if tool not in DOWNLOADERS:
            raise ValueError(f"LORA_DOWNLOADER must be one of {', '.join(DOWNLOADERS)}, got {tool!r}")
        self.pget = shutil.which("pget") if tool in ("auto", "pget") else None
        if tool == "pget" and not self.pget:
            raise ValueError("LORA_DOWNLOADER=pget but no pget on PATH")
        self.limits = limits or Limits.from_env()
        scrub_http_logs()

    @classmethod
    def from_env(cls) -> Downloader:
        return cls(config.lora_downloader())

    def download(self, url: str, dest: Path, headers: dict[str, str], name: str, service: str) -> None:
        """pget when installed and no header is needed (it takes none), else one Python stream;
        a pget failure (some hosts refuse the Range requests it makes) falls back to the stream."""
        if self.pget and not headers:
            try:
                self._pget(url, dest, name)
                return
            except Transient as exc:
                log.info("pget could not fetch %s (%s); downloading in one stream", name, exc)
        retrying(name, lambda: self._stream(url, dest, headers, name, service), self.limits)

    def _pget(self, url: str, dest: Path, name: str) -> None:
        try:
            result = subprocess.run(
                [self.pget, "-f", url, str(dest)], capture_output=True, text=True, timeout=self.limits.total_timeout
            )
        except subprocess.TimeoutExpired:
            raise Transient(f"no result after {self.limits.total_timeout:g}s") from None
        if result.returncode != 0:
            output = scrub((result.stderr or result.stdout).strip(), secrets=[url])
            raise Transient(f"exit {result.returncode}: {output.splitlines()[-1] if output else 'no output'}")
        self.check_size(dest.stat().st_size, name)

    def check_size(self, size: int, name: str) -> None:
        """Refuse a file over the size cap: before any byte when a host states the size, else while it streams."""
        if size > self.limits.max_bytes:
            raise WeightsError(f"{name} is {size} bytes, over the {self.limits.max_bytes}-byte limit")

    def _stream(self, url: str, dest: Path, headers: dict[str, str], name: str, service: str) -> None:
        timeout = (10, self.limits.timeout)
        with requests.get(url, headers=headers, stream=True, timeout=timeout) as resp:
            check_response(resp, name, service)
            expected = int(resp.headers.get("Content-Length") or 0)
            self.check_size(expected, name)
            received = 0
            with open(dest, "wb") as out:
                for chunk in resp.iter_content(1 << 20):
                    received += len(chunk)
                    self.check_size(received, name)
                    out.write(chunk)
        if expected and received != expected:
            raise Transient(f"truncated: {received} of {expected} bytes")


def server_failed(service: str, status: int) -> str:
    """A host's own failure, said so: the user's string is not the problem."""
    return f"{service} failed (HTTP {status}), a fault on its side, not in the request"


def check_response(resp: requests.Response, name: str, service: str) -> None:
    """Turn a response that is not the file into the error the user can act on."""
    if "/login" in urlsplit(resp.url).path:
        raise http_error(401, name, service)
    if resp.status_code >= 500:
        raise Transient(server_failed(service, resp.status_code))
    if resp.status_code >= 400:
        raise http_error(resp.status_code, name, service)
    if "text/html" in resp.headers.get("Content-Type", ""):
        raise WeightsError(f"{name} answered with an HTML page instead of a file: check the URL or token")
