"""The billable id rule (DESIGN §3), checked at every entry point: key creation, admin paths, the trusted
header and the middleware's callable.

1 to 128 characters from `A-Z a-z 0-9 . _ - : @ + = ~`, the first a letter or digit: emails, UUIDs,
`org_1` and Stripe ids fit; `.`, `..`, `/`, spaces, control characters and non-ASCII never do, so an id
is safe in a header, a path segment, a log line and a Redis key.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field

from gateway.errors import BadRequest

MAX_LENGTH = 128
RULE = "1 to 128 characters from A-Z a-z 0-9 . _ - : @ + = ~, the first a letter or digit"
PATTERN = r"[A-Za-z0-9][A-Za-z0-9._\-:@+=~]{0,127}"  # the rule as a regular expression (its OpenAPI schema too)
_BILLABLE = re.compile(PATTERN)
BillableId = Annotated[str, Field(pattern=f"^{PATTERN}$")]  # a body's billable, in its OpenAPI schema
_SHOWN = 40  # how much of a bad id a problem repeats: enough to recognize it, never a 10 KB echo


def billable(value: object, field: str) -> str:
    """`value` when it is a billable id, else BadRequest naming `field` (where the id came from)."""
    if isinstance(value, str) and _BILLABLE.fullmatch(value) is not None:
        return value
    if isinstance(value, str):
        shown = repr(value[:_SHOWN]) + ("..." if len(value) > _SHOWN else "")
        what = f"{shown} ({len(value)} characters)" if len(value) > MAX_LENGTH else shown
    else:
        what = "null" if value is None else f"{repr(value)[:_SHOWN]} (not a string)"
    raise BadRequest(f"{field}: {what} is not a billable id ({RULE}).")
