"""How the remote rewards (`http`, `vlm`) reach their servers: one POST per batch, over the standard library's
`http.client` so a training environment needs nothing more.

What `urllib.request.urlopen` did not give us, and a reward client must:

- **Keep-alive.** One connection per thread and server, reused batch after batch (a new connection per batch made
  16 parallel batches 5x slower than one). A reused connection the server has meanwhile closed is reopened once,
  without counting as an attempt.
- **A deadline on the whole answer.** `timeout` bounds connecting, sending and reading the entire answer; urllib's
  was per socket read, so a server dripping a byte a second never timed out. A timer shuts the socket at the deadline.
- **No redirects.** urllib turned a redirected POST into a GET, sent the bearer token to whatever host the redirect
  named and accepted that GET's answer as scores. A 3xx is an error naming where it pointed.
- **Retries that mean it.** Connection errors, timeouts, 408, 429 and 5xx are retried (unless the server's JSON
  error says `"retry": false`: a reward error that would fail again); other statuses fail at once. `Retry-After`
  (seconds or an HTTP date, at most `MAX_RETRY_AFTER_S`) is waited when longer than the backoff.
- **Several servers.** `urls` are taken in turn: each batch starts at the next one, and each retry goes to the
  next one (round-robin with failover, like the peers' comma-separated reward URLs).
"""

from __future__ import annotations

import email.utils
import http.client
import itertools
import json
import socket
import threading
import time
from urllib.parse import urlsplit

MAX_RETRY_AFTER_S = 300.0  # a server asking for longer is waited this long, not stalling training for hours
RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})  # worth another try; other 4xx will fail again


class RemoteRewardError(RuntimeError):
    """A remote reward call failed; the message is one line naming the URL and what happened."""


def parse_urls(url: str | list[str] | tuple[str, ...], kind: str) -> tuple[str, ...]:
    """The servers of a remote reward: one URL, several separated by commas, or a list. ValueError naming a URL that
    is not http(s)."""
    urls = [u.strip() for u in (url.split(",") if isinstance(url, str) else url) if isinstance(u, str) and u.strip()]
    if not urls or (not isinstance(url, str) and len(urls) != len(url)):
        raise ValueError(f"{kind} reward url must be a URL, several separated by commas, or a list of URLs; got "
                         f"{url!r}.")
    for one in urls:
        if not one.startswith(("http://", "https://")) or not urlsplit(one).hostname:
            raise ValueError(f"{kind} reward url must start with http:// or https:// and name a host; got {one!r}.")
    return tuple(urls)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` header asks to wait (delta-seconds or an HTTP date), clamped to [0,
    `MAX_RETRY_AFTER_S`]; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S) if seconds == seconds else None  # NaN: unreadable


def says_no_retry(body: bytes) -> bool:
    """Whether an error answer's JSON says `"retry": false` (the request itself is at fault)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("retry") is False


class Transport:
    """POSTs to one or more reward servers; see the module docstring. Thread-safe: each thread has its own
    connections."""

    def __init__(self, urls: tuple[str, ...], *, timeout: float, retries: int, backoff: float,
                 headers: dict[str, str] | None = None, kind: str = "http"):
        if not timeout > 0 or retries < 0 or backoff < 0:
            raise ValueError(f"{kind} reward needs timeout > 0, retries >= 0, backoff >= 0; got timeout={timeout!r}, "
                             f"retries={retries!r}, backoff={backoff!r}.")
        self.urls, self.timeout, self.retries, self.backoff = tuple(urls), float(timeout), int(retries), float(backoff)
        self.headers = dict(headers or {})
        self._turn = itertools.count()
        self._local = threading.local()

    def post(self, data: bytes, content_type: str) -> tuple[bytes, str]:
        """(the body of a 2xx answer, the URL that gave it); `RemoteRewardError` (one line naming the server and
        the last failure) otherwise."""
        start, wait, failure, attempts = next(self._turn), 0.0, "", 0
        for attempt in range(self.retries + 1):
            url = self.urls[(start + attempt) % len(self.urls)]
            if attempt:
                time.sleep(max(wait, self.backoff * 2 ** (attempt - 1)))
            attempts, wait = attempts + 1, 0.0
            try:
                status, reason, headers, body = self._exchange(url, data, content_type)
            except TimeoutError:
                failure = f"{url}: no answer within {self.timeout:g} s (timeout)"
                continue
            except (OSError, http.client.HTTPException) as err:
                failure = f"{url}: " + _connection_failure(err)
                continue
            if 200 <= status < 300:
                return body, url
            if 300 <= status < 400:
                raise RemoteRewardError(
                    f"reward server {url}: HTTP {status} redirect to {headers.get('Location')!r}; redirects are not "
                    "followed (the request and its token would go to another address): set the url to the final "
                    "address")
            detail = body[:200].decode("utf-8", "replace").strip().replace("\n", " ")
            failure = f"{url}: HTTP {status} {reason}" + (f": {detail}" if detail else "")
            if status not in RETRIED_STATUS or says_no_retry(body):
                break
            wait = retry_after_seconds(headers.get("Retry-After")) or 0.0
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        raise RemoteRewardError(f"reward server {failure}{tries}")

    def _exchange(self, url: str, data: bytes, content_type: str):
        """(status, reason, headers, body) of one POST on this thread's connection to `url`'s server."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.hostname, parts.port)
        connections = self._local.__dict__.setdefault("connections", {})
        connection = connections.get(key)
        reused = connection is not None
        if connection is None:
            connection = connections[key] = self._connect(parts)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"Content-Type": content_type, "Accept": "application/json", **self.headers}
        try:
            try:
                answer = self._round_trip(connection, path, data, headers)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
                connection.close()  # the server closed the idle connection: reopen once, not an attempt
                connection = connections[key] = self._connect(parts)
                answer = self._round_trip(connection, path, data, headers)
        except BaseException:
            connection.close()
            connections.pop(key, None)
            raise
        if answer[4]:  # the server closes after this answer
            connection.close()
            connections.pop(key, None)
        return answer[:4]

    def _connect(self, parts) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        return cls(parts.hostname, parts.port, timeout=self.timeout)

    def _round_trip(self, connection: http.client.HTTPConnection, path: str, data: bytes, headers: dict):
        """One request and its whole answer within `timeout`: a timer shuts the socket down at the deadline, which
        ends any read in progress."""
        expired = threading.Event()

        def expire():
            expired.set()
            sock = connection.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(self.timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            connection.request("POST", path, body=data, headers=headers)
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            if expired.is_set():
                raise TimeoutError from None
            raise
        finally:
            timer.cancel()
        if expired.is_set():
            raise TimeoutError
        return response.status, response.reason, response.headers, body, response.will_close


def _connection_failure(err: BaseException) -> str:
    if isinstance(err, ConnectionRefusedError | socket.gaierror) or (
            isinstance(err, OSError) and not isinstance(err, ConnectionError) and err.errno is not None):
        return f"cannot connect ({err.strerror or err})"
    return f"connection failed ({type(err).__name__}: {err})"
