from __future__ import annotations

import json

import pytest

from gateway.problems import bad_request_body, problem_messages, problem_response, too_large_body

pytestmark = pytest.mark.unit  # no service: `pytest -m unit` runs these in seconds


def test_every_413_closes_the_connection() -> None:
    """A 413 says `connection: close` whether the middleware, the proxy or an endpoint answers it."""
    start, _ = problem_messages(413, too_large_body("too big"))
    assert (b"connection", b"close") in start["headers"]
    assert problem_response(413, too_large_body("too big")).headers["connection"] == "close"
    start, _ = problem_messages(400, bad_request_body("bad"))
    assert all(name != b"connection" for name, _ in start["headers"])
    assert "connection" not in problem_response(400, bad_request_body("bad")).headers


def test_asgi_and_endpoint_answers_are_the_same_bytes() -> None:
    """The middleware's messages and an endpoint's response carry the same body, type and length."""
    body = bad_request_body("Send a number.")
    start, message = problem_messages(400, body, [(b"x-extra", b"1")])
    response = problem_response(400, body)
    assert message["body"] == response.body and json.loads(message["body"]) == body
    assert dict(start["headers"])[b"content-type"] == b"application/problem+json" == response.headers["content-type"].encode()
    assert dict(start["headers"])[b"content-length"] == str(len(response.body)).encode()
    assert start["headers"][-1] == (b"x-extra", b"1") and message["more_body"] is False


def test_a_websocket_refusal_uses_the_handshake_response_messages() -> None:
    """Refusing a websocket handshake sends websocket.http.response.* messages, the same problem body."""
    start, message = problem_messages(403, bad_request_body("no"), websocket=True)
    assert start["type"] == "websocket.http.response.start" and message["type"] == "websocket.http.response.body"
