"""Chat completions from an OpenAI-compatible HTTP server, or from a local jaxpersona model.

Both sides speak one small protocol, :class:`Completer`::

    complete(conversations, *, max_tokens, temperature, seed) -> list[str]   # one reply per conversation

:class:`OpenAIEndpoint` talks to ``POST {base_url}/chat/completions`` (vLLM, llama.cpp server,
OpenAI, ...) with only the standard library: requests run concurrently on a thread pool, results
come back in input order, and connection errors, timeouts, HTTP 429 and 5xx are retried with
exponential backoff. The API key is read from an environment variable at request time; it is
never stored on the object, printed, logged, or put into an exception message.

:class:`LocalCompleter` answers the same calls with a :class:`jaxpersona.compute.handle.Model` in JAX.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from jaxpersona import errors
from jaxpersona.compute.batching import check_count
from jaxpersona.data.chat import Message

if TYPE_CHECKING:
    from jaxpersona.compute.handle import Model

MAX_ERROR_BODY = 300  # characters of a server's error body quoted in an EndpointError


def redact_url(url: str) -> str:
    """``url`` without user:password and without a query string (where keys sometimes hide)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<invalid url>"
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _Retryable(Exception):
    """One failed attempt that may succeed if repeated (its message is already redacted)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclasses.dataclass
class OpenAIEndpoint:
    """An OpenAI-compatible chat-completions server.

    Args:
      base_url: the API base including ``/v1``, e.g. ``"http://localhost:8000/v1"``; requests go to
        ``{base_url}/chat/completions``.
      model: the ``model`` field sent with every request.
      api_key_env: name of the environment variable holding the API key (read at request time and
        sent as ``Authorization: Bearer ...``); ``None`` or an unset variable sends no key.
      timeout: seconds per request attempt.
      retries: extra attempts after a connection error, timeout, HTTP 429 or 5xx.
      backoff: the delay before retry ``i`` (0-based) is ``backoff * 2**i`` seconds (no jitter;
        ``0`` retries at once). A 429's ``Retry-After`` raises the delay (capped at 60 s) if ``backoff > 0``.
      concurrency: requests in flight at once in :meth:`chat_many` / :meth:`complete`.
    """

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 1.0
    concurrency: int = 8

    def __post_init__(self) -> None:
        scheme = urllib.parse.urlsplit(str(self.base_url)).scheme
        if scheme not in ("http", "https"):
            raise errors.InputError(
                f"endpoint base_url must start with http:// or https://, got {redact_url(str(self.base_url))!r} "
                "(e.g. http://localhost:8000/v1)"
            )
        if urllib.parse.urlsplit(str(self.base_url)).username is not None:
            raise errors.InputError(
                f"endpoint base_url {redact_url(str(self.base_url))!r} carries user:password credentials; drop them "
                f"from the URL and put the API key in the environment variable {self.api_key_env or 'OPENAI_API_KEY'!r}"
            )
        if not self.model:
            raise errors.InputError("endpoint model name is empty; pass the model the server serves")
        if not self.timeout > 0:
            raise errors.InputError(f"endpoint timeout must be > 0 seconds, got {self.timeout}")
        if int(self.retries) != self.retries or self.retries < 0:
            raise errors.InputError(f"endpoint retries must be an integer >= 0, got {self.retries}")
        if not self.backoff >= 0:
            raise errors.InputError(f"endpoint backoff must be >= 0 seconds, got {self.backoff}")
        if int(self.concurrency) != self.concurrency or self.concurrency < 1:
            raise errors.InputError(f"endpoint concurrency must be an integer >= 1, got {self.concurrency}")

    def __repr__(self) -> str:  # explicit, so no field added later can leak into logs by accident
        return (
            f"OpenAIEndpoint(base_url={redact_url(self.base_url)!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, timeout={self.timeout}, retries={self.retries}, "
            f"backoff={self.backoff}, concurrency={self.concurrency})"
        )

    # --- plumbing -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return str(self.base_url).rstrip("/") + "/chat/completions"

    def _key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None if self.api_key_env else None

    @staticmethod
    def _scrub(text: str, key: str | None) -> str:
        return text.replace(key, "***") if key else text

    def _attempt(self, body: bytes, key: str | None) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                detail = e.read().decode("utf-8", "replace")
            except Exception:  # noqa: BLE001 - the body is only decoration for the message
                detail = ""
            detail = self._scrub(" ".join(detail.split()), key)[:MAX_ERROR_BODY]
            msg = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
            if e.code == 429 or e.code >= 500:
                retry_after = None
                try:
                    retry_after = float(e.headers.get("Retry-After", "")) if e.headers else None
                except ValueError:
                    pass
                raise _Retryable(msg, retry_after) from None
            raise errors.EndpointError(
                f"{redact_url(self.url)} refused the request ({msg}); check the model name, the API key "
                f"(env var {self.api_key_env!r}) and the request options"
            ) from None
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError, ConnectionError) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise _Retryable(self._scrub(f"{type(reason).__name__}: {reason}", key)) from None
        except OSError as e:  # anything else at the socket level (reset mid-read, ...)
            raise _Retryable(self._scrub(f"{type(e).__name__}: {e}", key)) from None
        try:
            out = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            snippet = self._scrub(raw[:MAX_ERROR_BODY].decode("utf-8", "replace"), key)
            raise errors.EndpointError(
                f"{redact_url(self.url)} returned a body that is not JSON ({snippet!r}); "
                "is --judge-url the OpenAI-compatible /v1 base of the server?"
            ) from None
        if not isinstance(out, dict):
            raise errors.EndpointError(f"{redact_url(self.url)} returned JSON that is not an object")
        return out

    def _post(self, payload: dict) -> dict:
        body = json.dumps(payload).encode()
        key = self._key()
        last = ""
        for attempt in range(int(self.retries) + 1):
            try:
                return self._attempt(body, key)
            except _Retryable as e:
                last = str(e)
                if attempt < self.retries:
                    delay = self.backoff * 2**attempt
                    if e.retry_after is not None and self.backoff > 0:
                        delay = max(delay, min(e.retry_after, 60.0))
                    if delay > 0:
                        time.sleep(delay)
        raise errors.EndpointError(
            f"endpoint {redact_url(self.url)} failed after {int(self.retries) + 1} attempt(s); last error: {last}. "
            "Check that the server is running and reachable, and the --judge-url (the /v1 base URL)."
        )

    # --- API ------------------------------------------------------------------------------
    def _payload(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0,
                 logprobs: bool = False, top_logprobs: int = 0, seed: int | None = None) -> dict:
        if not isinstance(messages, list) or not messages:
            raise errors.InputError("a conversation must be a non-empty list of {'role', 'content'} messages")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise errors.InputError(f"each message needs 'role' and 'content', got {m!r}")
        if int(max_tokens) != max_tokens or max_tokens < 1:
            raise errors.InputError(f"max_tokens must be an integer >= 1, got {max_tokens}")
        if not temperature >= 0:
            raise errors.InputError(f"temperature must be >= 0, got {temperature}")
        payload: dict[str, Any] = {
            "model": self.model, "messages": messages, "max_tokens": int(max_tokens), "temperature": float(temperature),
        }
        if logprobs:
            payload["logprobs"] = True
            if top_logprobs:
                payload["top_logprobs"] = int(top_logprobs)
        if seed is not None:
            payload["seed"] = int(seed)
        return payload

    def chat(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0, logprobs: bool = False,
             top_logprobs: int = 0, seed: int | None = None) -> dict:
        """One chat completion; returns the server's parsed JSON response."""
        return self._post(self._payload(messages, max_tokens=max_tokens, temperature=temperature, logprobs=logprobs,
                                        top_logprobs=top_logprobs, seed=seed))

    def chat_many(self, conversations: list[list[Message]], **kw: Any) -> list[dict]:
        """:meth:`chat` for each conversation, ``concurrency`` at a time; responses in input order.

        The first failure (in input order) is raised and requests not yet started are cancelled.
        """
        payloads = [self._payload(c, **kw) for c in conversations]  # validate everything before sending
        if not payloads:
            return []
        if len(payloads) == 1 or self.concurrency == 1:
            return [self._post(p) for p in payloads]
        pool = ThreadPoolExecutor(max_workers=min(int(self.concurrency), len(payloads)))
        try:
            futures = [pool.submit(self._post, p) for p in payloads]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def complete(self, conversations: list[list[Message]], *, max_tokens: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[str]:
        """One reply text per conversation (:class:`Completer`)."""
        out = []
        for resp in self.chat_many(conversations, max_tokens=max_tokens, temperature=temperature, seed=seed):
            try:
                content = resp["choices"][0]["message"].get("content")
            except (KeyError, IndexError, TypeError, AttributeError):
                raise errors.EndpointError(
                    f"{redact_url(self.url)} returned no choices[0].message; is it an OpenAI-compatible "
                    "chat-completions server?"
                ) from None
            out.append(content or "")
        return out


class LocalCompleter:
    """:class:`Completer` over a local :class:`~jaxpersona.compute.handle.Model` (chat template, batched in JAX).

    Conversations are generated ``batch_size`` at a time; every chunk is padded to the same number of
    rows (``batch_size``, or the next power of two for fewer conversations) so calls reuse compiled code. Sampling uses
    ``top_p=0.95`` when ``temperature > 0``; the same seed gives the same texts.
    """

    def __init__(self, model: Model, batch_size: int = 16) -> None:
        self.batch_size = check_count(batch_size)
        self.model = model

    def __repr__(self) -> str:
        return f"LocalCompleter(model={self.model.name or self.model.cfg.family!r}, batch_size={self.batch_size})"

    def complete(self, conversations: list[list[Message]], *, max_tokens: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[str]:
        conversations = list(conversations)
        if not conversations:
            return []
        seed = 0 if seed is None else int(seed)
        top_p = 0.95 if temperature > 0 else 1.0
        out: list[str] = []
        rows = min(self.batch_size, 1 << (len(conversations) - 1).bit_length())  # one batch shape per call
        for ci, start in enumerate(range(0, len(conversations), self.batch_size)):
            chunk = conversations[start : start + self.batch_size]
            padded = chunk + [chunk[-1]] * (rows - len(chunk))
            batch = self.model.encode_conversations(padded)
            gen = self.model.generate_tokens(batch, max_new_tokens=int(max_tokens), temperature=float(temperature),
                                             top_p=top_p, seed=(seed * 1_000_003 + ci) % (2**31))
            out.extend(self.model.decode(gen)[: len(chunk)])
        return out
