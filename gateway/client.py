"""For API consumers: read the gateway's limit headers, and retry a 429 after the wait it names.

`parse_limits` takes any response with `.headers` (httpx, requests, aiohttp) or headers themselves (a
mapping, or (name, value) pairs of str or bytes) without importing an HTTP library. Malformed fields
are ignored, as draft-ietf-httpapi-ratelimit-headers asks: they read as None, never as an exception.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any, TypeVar

R = TypeVar("R")
BareItem = int | float | str | bool | bytes

_INTEGER = re.compile(r"[0-9]{1,15}")
_SIGNED = re.compile(r"-?[0-9]{1,15}")


@dataclass(frozen=True)
class PolicyState:
    """One policy, joined from RateLimit-Policy (quota, window) and RateLimit (remaining, reset)."""

    name: str
    quota: int | None = None
    window: int | None = None
    remaining: int | None = None
    reset: int | None = None  # seconds until more is available


@dataclass(frozen=True)
class Limits:
    """Everything the gateway said about limits on one response; None where it said nothing usable."""

    policies: dict[str, PolicyState]
    credits_remaining: int | None = None
    retry_after: int | None = None
    degraded: bool = False
    limit: int | None = None
    remaining: int | None = None
    reset_at: int | None = None  # Unix seconds
    resource: str | None = None

    def tightest(self) -> PolicyState | None:
        """The policy with the least remaining relative to its quota (the longer wait breaks a tie)."""
        known = [p for p in self.policies.values() if p.remaining is not None]
        return min(known, key=_pressure, default=None)


def _pressure(policy: PolicyState) -> tuple[float, int]:
    remaining = policy.remaining or 0
    if policy.quota is None:
        share = 0.0 if remaining == 0 else 1.0
    else:
        share = remaining / policy.quota if policy.quota else 0.0
    return share, -(policy.reset or 0)


def parse_limits(response_or_headers: object) -> Limits:
    """Read the gateway's limit headers from a response (httpx, requests, aiohttp) or from headers."""
    fields = _fields(response_or_headers)
    quotas = dict(_items(fields.get("ratelimit-policy")))
    states = dict(_items(fields.get("ratelimit")))
    policies = {
        name: PolicyState(
            name,
            quota=_count(quotas.get(name, {}).get("q")),
            window=_count(quotas.get(name, {}).get("w")),
            remaining=_count(states.get(name, {}).get("r")),
            reset=_count(states.get(name, {}).get("t")),
        )
        for name in [*quotas, *(n for n in states if n not in quotas)]
    }
    return Limits(
        policies=policies,
        credits_remaining=_integer(fields.get("x-credits-remaining"), _SIGNED),
        retry_after=_retry_after(fields.get("retry-after")),
        degraded=bool(fields.get("x-gateway-degraded")),
        limit=_integer(fields.get("x-ratelimit-limit")),
        remaining=_integer(fields.get("x-ratelimit-remaining")),
        reset_at=_integer(fields.get("x-ratelimit-reset")),
        resource=fields.get("x-ratelimit-resource") or None,
    )


def _fields(source: Any) -> dict[str, str]:
    headers = getattr(source, "headers", source)
    if hasattr(headers, "multi_items"):
        pairs = headers.multi_items()  # httpx: a field sent twice stays two lines
    elif hasattr(headers, "items"):
        pairs = headers.items()
    else:
        pairs = headers
    fields: dict[str, str] = {}
    for raw_name, raw_value in pairs:
        name, value = _text(raw_name).strip().lower(), _text(raw_value).strip()
        # Structured lists split over several lines join with commas (RFC 9651 §3.1).
        fields[name] = f"{fields[name]}, {value}" if name in fields else value
    return fields


def _text(value: object) -> str:
    return value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)


def _items(value: str | None) -> list[tuple[str, dict[str, BareItem]]]:
    if not value:
        return []
    try:
        return parse_structured_list(value)
    except ValueError:
        return []


def _count(value: BareItem | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _integer(value: str | None, pattern: re.Pattern[str] = _INTEGER) -> int | None:
    return int(value) if value is not None and pattern.fullmatch(value) else None


def _retry_after(value: str | None) -> int | None:
    if value is None or _INTEGER.fullmatch(value):
        return _integer(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # an HTTP-date is always GMT
    return max(0, math.ceil(when.timestamp() - time.time()))


async def wait_and_retry(
    send: Callable[[], Awaitable[R]],
    *,
    max_attempts: int = 5,
    max_wait: float = 60,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> R:
    """Send; on a 429 wait as the gateway says (at most `max_wait`) and send again; return the last answer.

    Only 429 is retried: a 402 (credits) or 403 (plan, cap) does not change by waiting.
    """
    _check_attempts(max_attempts)
    response = await send()
    for _ in range(max_attempts - 1):
        delay = _retry_delay(response, max_wait)
        if delay is None:
            break
        await sleep(delay)
        response = await send()
    return response


def wait_and_retry_sync(
    send: Callable[[], R],
    *,
    max_attempts: int = 5,
    max_wait: float = 60,
    sleep: Callable[[float], object] = time.sleep,
) -> R:
    """`wait_and_retry` for blocking clients."""
    _check_attempts(max_attempts)
    response = send()
    for _ in range(max_attempts - 1):
        delay = _retry_delay(response, max_wait)
        if delay is None:
            break
        sleep(delay)
        response = send()
    return response


def _check_attempts(max_attempts: int) -> None:
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")


def _retry_delay(response: object, max_wait: float) -> float | None:
    """Seconds to wait before trying again, or None when trying again would not help."""
    status = getattr(response, "status_code", None)
    if status is None:
        status = getattr(response, "status", None)  # aiohttp
    if status != 429:
        return None
    limits = parse_limits(response)
    if limits.retry_after is not None:
        wait = limits.retry_after
    else:
        # A policy that still has room is not what refused us: a monthly allowance with units left would
        # otherwise make us wait for the month's end.
        policies = [p for p in limits.policies.values() if p.reset is not None]
        empty = [p for p in policies if p.remaining == 0] or policies
        wait = max((p.reset or 0 for p in empty), default=1)
    return max(0.0, min(float(wait), max_wait))


# RFC 9651 (Structured Field Values): the List type, which both rate-limit fields are.

_TOKEN_REST = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_NUMBER = re.compile(r"-?([0-9]+)(?:\.([0-9]*))?")
_BYTES = re.compile(r"[A-Za-z0-9+/=]*")
_OWS = " \t"


def parse_structured_list(value: str) -> list[tuple[str, dict[str, BareItem]]]:
    """Parse an RFC 9651 List whose members are string or token Items with Parameters.

    `"rate";r=42;t=1, "credits";r=7` → [("rate", {"r": 42, "t": 1}), ("credits", {"r": 7})]. Parameter
    values are int, float (Decimal), str (String, Token, Display String), bool or bytes (Byte Sequence);
    a Date reads as its int. Whitespace is allowed around commas and semicolons. An empty value is an
    empty list; anything else malformed, and Inner Lists, raise ValueError.
    """
    return _Parser(value).list()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text.strip(_OWS)
        self.at = 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"structured field: {what} at offset {self.at} of {self.text!r}")

    def peek(self) -> str:
        return self.text[self.at : self.at + 1]

    def skip_ows(self) -> None:
        while self.peek() and self.peek() in _OWS:
            self.at += 1

    def list(self) -> list[tuple[str, dict[str, BareItem]]]:
        members: list[tuple[str, dict[str, BareItem]]] = []
        while self.at < len(self.text):
            if self.peek() == "(":
                raise self.fail("inner list (not supported)")
            item = self.bare_item()
            if not isinstance(item, str):
                raise self.fail("a list member that is not a string or token")
            members.append((item, self.parameters()))
            self.skip_ows()
            if self.at == len(self.text):
                break
            if self.peek() != ",":
                raise self.fail("expected ','")
            self.at += 1
            self.skip_ows()
            if self.at == len(self.text):
                raise self.fail("trailing ','")
        return members

    def parameters(self) -> dict[str, BareItem]:
        params: dict[str, BareItem] = {}
        while True:
            start = self.at
            self.skip_ows()
            if self.peek() != ";":
                self.at = start
                return params
            self.at += 1
            self.skip_ows()
            key = _KEY.match(self.text, self.at)
            if key is None:
                raise self.fail("expected a parameter key")
            self.at = key.end()
            if self.peek() == "=":
                self.at += 1
                params[key[0]] = self.bare_item()
            else:
                params[key[0]] = True

    def bare_item(self) -> BareItem:
        char = self.peek()
        if char and char in "-0123456789":
            return self.number()
        if char == '"':
            return self.string()
        if char == "*" or (char.isascii() and char.isalpha()):
            token = _TOKEN_REST.match(self.text, self.at + 1)
            assert token is not None  # the pattern matches the empty string
            self.at = token.end()
            return self.text[token.start() - 1 : token.end()]
        if char == ":":
            return self.byte_sequence()
        if char == "?":
            flag = self.text[self.at + 1 : self.at + 2]
            if flag not in ("0", "1"):
                raise self.fail("expected ?0 or ?1")
            self.at += 2
            return flag == "1"
        if char == "@":
            self.at += 1
            date = self.number()
            if not isinstance(date, int):
                raise self.fail("a date that is not an integer")
            return date
        if char == "%":
            return self.display_string()
        raise self.fail("expected an item")

    def number(self) -> int | float:
        match = _NUMBER.match(self.text, self.at)
        if match is None:
            raise self.fail("expected a number")
        whole, fraction = match[1], match[2]
        if fraction is None:
            if len(whole) > 15:
                raise self.fail("an integer longer than 15 digits")
        elif len(whole) > 12 or not 1 <= len(fraction) <= 3:
            raise self.fail("a decimal outside 12.3 digits")
        self.at = match.end()
        return int(match[0]) if fraction is None else float(match[0])

    def string(self) -> str:
        out: list[str] = []
        self.at += 1
        while self.at < len(self.text):
            char = self.text[self.at]
            self.at += 1
            if char == "\\":
                escaped = self.peek()
                if escaped not in ('"', "\\") or not escaped:
                    raise self.fail("a bad escape in a string")
                out.append(escaped)
                self.at += 1
            elif char == '"':
                return "".join(out)
            elif not " " <= char <= "~":
                raise self.fail("a control or non-ASCII character in a string")
            else:
                out.append(char)
        raise self.fail("an unterminated string")

    def byte_sequence(self) -> bytes:
        match = _BYTES.match(self.text, self.at + 1)
        assert match is not None  # the pattern matches the empty string
        if self.text[match.end() : match.end() + 1] != ":":
            raise self.fail("an unterminated byte sequence")
        self.at = match.end() + 1
        try:
            return base64.b64decode(match[0], validate=True)
        except ValueError:
            raise self.fail("bad base64 in a byte sequence") from None

    def display_string(self) -> str:
        if self.text[self.at + 1 : self.at + 2] != '"':
            raise self.fail('expected %"')
        self.at += 2
        out = bytearray()
        while self.at < len(self.text):
            char = self.text[self.at]
            self.at += 1
            if char == "%":
                hex_ = self.text[self.at : self.at + 2]
                if len(hex_) != 2 or any(c not in "0123456789abcdef" for c in hex_):
                    raise self.fail("a bad %-escape in a display string")
                out.append(int(hex_, 16))
                self.at += 2
            elif char == '"':
                try:
                    return out.decode("utf-8")
                except UnicodeDecodeError:
                    raise self.fail("a display string that is not UTF-8") from None
            elif not " " <= char <= "~":
                raise self.fail("a control or non-ASCII character in a display string")
            else:
                out.append(ord(char))
        raise self.fail("an unterminated display string")
