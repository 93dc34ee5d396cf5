"""A small Stripe API double for tests: the objects billing reads and writes, in memory, under uvicorn.

The real `StripeClient` reaches it through GATEWAY_STRIPE_API_BASE (form-encoded requests, list pages
with `starting_after`, errors in Stripe's shape, `Idempotency-Key` replays). Tests change Stripe's side
through its helpers (`subscribe`, `complete_checkout`, `refund`, ...) and sign the events they deliver
with `sign` (Stripe's scheme: `t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<payload>">`).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import itertools
import json
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

KINDS = {
    "products": "prod",
    "prices": "price",
    "features": "feat",
    "product_features": "prodft",
    "customers": "cus",
    "subscriptions": "sub",
    "invoices": "in",
    "payment_intents": "pi",
    "charges": "ch",
    "refunds": "re",
    "checkout_sessions": "cs",
}
OBJECT_NAMES = {
    "products": "product",
    "prices": "price",
    "features": "entitlements.feature",
    "product_features": "product_feature",
    "customers": "customer",
    "subscriptions": "subscription",
    "invoices": "invoice",
    "payment_intents": "payment_intent",
    "charges": "charge",
    "refunds": "refund",
    "checkout_sessions": "checkout.session",
}
INTS = {"unit_amount", "amount", "quantity", "limit", "interval_count", "gte", "lte", "gt", "lt"}
BOOLS = {"active", "off_session", "confirm", "cancel_at_period_end", "transfer_lookup_key"}


def sign(payload: str, secret: str, timestamp: int | None = None) -> str:
    """A Stripe-Signature header for `payload`."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.{payload}".encode(), hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def _convert(key: str, value: str) -> Any:
    if key in INTS and re.fullmatch(r"-?\d+", value):
        return int(value)
    if key in BOOLS and value in ("true", "false"):
        return value == "true"
    return value


def parse_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """`a[b][0][c]=v` pairs → nested dicts and lists, as Stripe reads them."""
    root: dict[str, Any] = {}
    for raw_key, value in pairs:
        parts = re.findall(r"[^\[\]]+", raw_key)
        node: Any = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt = None if last else parts[i + 1]
            container: Any = [] if nxt is not None and nxt.isdigit() else {}
            if isinstance(node, list):
                index = int(part)
                while len(node) <= index:
                    node.append(None)
                if last:
                    node[index] = _convert(parts[-2] if len(parts) > 1 else part, value)
                else:
                    if node[index] is None:
                        node[index] = container
                    node = node[index]
            else:
                if last:
                    node[part] = _convert(part, value)
                else:
                    node = node.setdefault(part, container)
    return root


class StripeError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status, self.body = status, body


def _missing(kind: str, oid: str) -> StripeError:
    return StripeError(
        404,
        {"error": {"type": "invalid_request_error", "code": "resource_missing", "message": f"No such {OBJECT_NAMES[kind]}: '{oid}'"}},
    )


class FakeStripe:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.db: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        self.created: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []
        self.idempotent: dict[str, tuple[str, int, dict[str, Any]]] = {}
        self.replays = 0
        self.card_outcomes: dict[str, list[str]] = defaultdict(list)  # payment method → next outcomes
        self.entitlements: dict[str, list[str]] = {}  # customer → active feature lookup keys
        self.fail_next: list[int] = []  # HTTP statuses to answer to the next requests (then normal)
        # Billing meters: meter id → meter; every meter event accepted, in order; their identifiers.
        self.meters: dict[str, dict[str, Any]] = {}
        self.meter_events: list[dict[str, Any]] = []
        self.meter_identifiers: set[str] = set()
        self.duplicate_meter_events = 0
        # The v2 meter event stream: session token → when it expires (unix s), the sessions' life, and
        # the events the stream took but Stripe refused later (its asynchronous validation).
        self.stream_sessions: dict[str, float] = {}
        self.session_seconds = 900.0
        self.stream_errors: list[str] = []
        self.stream_requests = 0
        self._ids = itertools.count(1)

    # ---- objects ---------------------------------------------------------------------------------------

    def new_id(self, kind: str) -> str:
        return f"{KINDS[kind]}_{next(self._ids):06d}{hashlib.sha1(str(time.time_ns()).encode()).hexdigest()[:8]}"

    def put(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            obj.setdefault("id", self.new_id(kind))
            obj.setdefault("object", OBJECT_NAMES[kind])
            obj.setdefault("created", int(time.time()))
            obj.setdefault("livemode", False)
            self.db[kind][obj["id"]] = obj
            self.created[kind] += 1
            return obj

    def get(self, kind: str, oid: str) -> dict[str, Any]:
        with self.lock:
            found = self.db[kind].get(oid)
            if found is None:
                raise _missing(kind, oid)
            return found

    def view(self, kind: str, oid: str) -> dict[str, Any]:
        """An object as the API shows it (a deep copy, with nested objects filled in)."""
        with self.lock:
            obj = copy.deepcopy(self.get(kind, oid))
            if kind == "product_features":
                obj["entitlement_feature"] = copy.deepcopy(self.get("features", obj["entitlement_feature"]))
            return obj

    # ---- helpers for tests: Stripe's side changing -----------------------------------------------------------

    def add_customer(self, billable: str | None = None, *, payment_method: str | None = None) -> dict[str, Any]:
        meta = {"billable": billable} if billable else {}
        return self.put(
            "customers",
            {"metadata": meta, "invoice_settings": {"default_payment_method": payment_method}, "deleted": False},
        )

    def add_price(self, lookup_key: str | None, amount: int, *, interval: str | None = "month", product: str | None = None,
                  plan: str | None = None, currency: str = "usd") -> dict[str, Any]:
        if product is None:
            product = self.put("products", {"name": lookup_key or "product", "active": True, "metadata": {}, "description": None})["id"]
        return self.put(
            "prices",
            {
                "product": product,
                "unit_amount": amount,
                "currency": currency,
                "lookup_key": lookup_key,
                "active": True,
                "recurring": {"interval": interval, "interval_count": 1} if interval else None,
                "metadata": {"plan": plan} if plan else {},
                "type": "recurring" if interval else "one_time",
            },
        )

    def price_by_key(self, lookup_key: str) -> dict[str, Any]:
        with self.lock:
            return next(p for p in self.db["prices"].values() if p.get("lookup_key") == lookup_key and p.get("active"))

    def subscribe(self, customer: str, price: str, *, status: str = "active", start: float | None = None,
                  end: float | None = None, trial_end: int | None = None) -> dict[str, Any]:
        start = int(start if start is not None else time.time() - 86400)
        end = int(end if end is not None else start + 30 * 86400)
        item = {"id": self.new_id("subscriptions").replace("sub_", "si_"), "object": "subscription_item",
                "price": copy.deepcopy(self.get("prices", price)), "quantity": 1,
                "current_period_start": start, "current_period_end": end}
        return self.put(
            "subscriptions",
            {
                "customer": customer,
                "status": status,
                "items": {"object": "list", "data": [item], "has_more": False},
                "cancel_at_period_end": False,
                "trial_end": trial_end,
                "metadata": {},
            },
        )

    def update_subscription(self, sub: str, *, price: str | None = None, start: float | None = None,
                            end: float | None = None, **changes: Any) -> dict[str, Any]:
        with self.lock:
            obj = self.get("subscriptions", sub)
            obj.update(changes)
            item = obj["items"]["data"][0]
            if price is not None:
                item["price"] = copy.deepcopy(self.get("prices", price))
            if start is not None:
                item["current_period_start"] = int(start)
            if end is not None:
                item["current_period_end"] = int(end)
            return copy.deepcopy(obj)

    def invoice(self, sub: str, *, status: str = "paid") -> dict[str, Any]:
        obj = self.get("subscriptions", sub)
        return self.put(
            "invoices",
            {"customer": obj["customer"], "status": status, "subscription": None,
             "parent": {"type": "subscription_details", "subscription_details": {"subscription": sub}}},
        )

    def complete_checkout(self, session_id: str) -> dict[str, Any]:
        """The customer paid: a succeeded PaymentIntent with the session's payment_intent_data."""
        with self.lock:
            session = self.get("checkout_sessions", session_id)
            pi = self._succeed_intent(session["amount_total"], session["currency"], session.get("customer"),
                                      (session.get("payment_intent_data") or {}).get("metadata") or {})
            session.update(status="complete", payment_status="paid", payment_intent=pi["id"])
            return copy.deepcopy(session)

    def _succeed_intent(self, amount: int, currency: str, customer: str | None, metadata: dict[str, Any]) -> dict[str, Any]:
        pi = self.put("payment_intents", {"amount": amount, "currency": currency, "customer": customer,
                                          "metadata": metadata, "status": "succeeded", "amount_received": amount})
        charge = self.put("charges", {"amount": amount, "amount_refunded": 0, "payment_intent": pi["id"],
                                      "refunded": False, "currency": currency})
        pi["latest_charge"] = charge["id"]
        return pi

    def refund(self, payment_intent: str, amount: int | None = None) -> dict[str, Any]:
        with self.lock:
            pi = self.get("payment_intents", payment_intent)
            charge = self.get("charges", pi["latest_charge"])
            amount = amount if amount is not None else charge["amount"] - charge["amount_refunded"]
            charge["amount_refunded"] += amount
            charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
            return self.put("refunds", {"amount": amount, "payment_intent": payment_intent, "charge": charge["id"],
                                        "status": "succeeded", "currency": charge["currency"]})

    def event(self, type_: str, obj: dict[str, Any], *, created: int | None = None) -> dict[str, Any]:
        """An event as Stripe sends it: a copy of the object as it is now (stale by the time it arrives)."""
        return {
            "id": f"evt_{next(self._ids):06d}{hashlib.sha1(str(time.time_ns()).encode()).hexdigest()[:10]}",
            "object": "event",
            "api_version": "2026-10-28.endive",
            "type": type_,
            "created": int(time.time()) if created is None else created,
            "livemode": False,
            "data": {"object": copy.deepcopy(obj)},
        }

    def count(self, kind: str) -> int:
        with self.lock:
            return len(self.db[kind])

    # ---- the HTTP API -------------------------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/{path:path}", self._handle, methods=["GET", "POST", "DELETE"]),
                                 Route("/v2/billing/{path:path}", self._handle_v2, methods=["POST"])])  # fmt: skip

    def expire_sessions(self) -> None:
        """Every meter event stream token expires now (as 15 minutes would)."""
        with self.lock:
            self.stream_sessions = dict.fromkeys(self.stream_sessions, 0.0)

    async def _handle_v2(self, request: Request) -> Response:
        """The v2 meter event session (the secret key) and stream (a session's token), JSON in and out."""
        path = request.path_params["path"].strip("/")
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        raw = await request.body()
        with self.lock:
            self.requests.append(("POST", f"v2/billing/{path}"))
            if self.fail_next:
                return JSONResponse({"error": {"type": "api_error", "message": "injected failure"}}, status_code=self.fail_next.pop(0))
            if path == "meter_event_session":
                if not token.startswith("sk_"):
                    return JSONResponse({"error": {"type": "invalid_request_error", "message": "A secret key is required."}}, status_code=401)
                made = f"mes_tok_{uuid.uuid4().hex}"
                expires = time.time() + self.session_seconds
                self.stream_sessions[made] = expires
                at = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(expires))
                return JSONResponse({"id": f"mes_{uuid.uuid4().hex[:16]}", "object": "v2.billing.meter_event_session",
                                     "authentication_token": made, "expires_at": at, "livemode": False,
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())})  # fmt: skip
            if path != "meter_event_stream":
                return JSONResponse({"error": {"type": "invalid_request_error", "message": f"Unrecognized request URL ({path})"}}, status_code=404)
            if self.stream_sessions.get(token, 0.0) <= time.time():
                return JSONResponse({"error": {"type": "temporary_session_expired", "code": "billing_meter_event_session_expired",
                                               "message": "The meter event session has expired: create a new one."}}, status_code=401)  # fmt: skip
            events = json.loads(raw or b"{}").get("events")
            if not isinstance(events, list) or not 1 <= len(events) <= 100:
                return JSONResponse({"error": {"type": "invalid_request_error", "message": "events: 1 to 100 events."}}, status_code=400)
            self.stream_requests += 1
            for e in events:  # validated after the answer, as Stripe does: a refusal is reported, not answered
                at = e.get("timestamp")
                when = int(datetime.fromisoformat(at).timestamp()) if at else None
                try:
                    self._accept(e.get("event_name"), e.get("identifier"), e.get("payload") or {}, when)
                except StripeError as exc:
                    if exc.body["error"].get("code") != "duplicate_meter_event":
                        self.stream_errors.append(exc.body["error"]["message"])
            return JSONResponse({})

    async def _handle(self, request: Request) -> Response:
        raw = (await request.body()).decode()
        pairs = parse_qsl(request.url.query, keep_blank_values=True) + parse_qsl(raw, keep_blank_values=True)
        params = parse_form(pairs)
        path = request.path_params["path"].strip("/")
        method = request.method
        with self.lock:
            self.requests.append((method, path))
            if self.fail_next:
                status = self.fail_next.pop(0)
                return JSONResponse({"error": {"type": "api_error", "message": "injected failure"}}, status_code=status)
            key = request.headers.get("idempotency-key")
            fingerprint = f"{method} {path} {json.dumps(params, sort_keys=True)}"
            if method == "POST" and key and key in self.idempotent:
                seen, status, body = self.idempotent[key]
                if seen != fingerprint:
                    return JSONResponse(
                        {"error": {"type": "idempotency_error",
                                   "message": "Keys for idempotent requests can only be used with the same parameters they were first used with."}},
                        status_code=400,
                    )
                self.replays += 1
                return JSONResponse(body, status_code=status, headers={"Idempotent-Replayed": "true"})
            try:
                status, body = 200, self._route(method, path, params)
            except StripeError as exc:
                status, body = exc.status, exc.body
            if method == "POST" and key and status != 500:
                self.idempotent[key] = (fingerprint, status, body)
            return JSONResponse(body, status_code=status)

    def _route(self, method: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
        parts = path.split("/")
        if parts[0] == "billing" and len(parts) >= 2 and parts[1] in ("meters", "meter_events"):
            return self._metering(method, parts[1:], params)
        if parts[0] == "entitlements":
            if parts[1] == "features" and len(parts) == 2:
                return self._create_feature(params) if method == "POST" else self._list("features", params)
            if parts[1] == "active_entitlements":
                return self._active_entitlements(params)
        if parts[0] == "billing_portal" and parts[1] == "sessions" and method == "POST":
            customer = self.get("customers", params["customer"])["id"]
            portal = f"bps_{uuid.uuid4().hex[:14]}"
            return {"id": portal, "object": "billing_portal.session", "customer": customer,
                    "return_url": params.get("return_url"), "url": f"https://billing.stripe.test/p/session/{portal}"}
        if parts[0] == "checkout" and parts[1] == "sessions":
            if len(parts) == 2:
                return self._create_session(params) if method == "POST" else self._list("checkout_sessions", params)
            return self.view("checkout_sessions", parts[2])
        kind = parts[0]
        if kind == "products" and len(parts) >= 3 and parts[2] == "features":
            product = self.get("products", parts[1])["id"]
            if method == "POST":
                feature = self.get("features", params["entitlement_feature"])
                obj = self.put("product_features", {"product": product, "entitlement_feature": feature["id"]})
                return self.view("product_features", obj["id"])
            found = [f for f in self.db["product_features"].values() if f["product"] == product]
            return self._page([self.view("product_features", f["id"]) for f in found], params, f"/v1/products/{product}/features")
        if kind not in KINDS:
            raise StripeError(404, {"error": {"type": "invalid_request_error", "message": f"Unrecognized request URL ({path})"}})
        if len(parts) == 1:
            if method == "POST":
                return self._create(kind, params)
            return self._list(kind, params)
        oid = parts[1]
        if kind == "customers" and oid == "search" and method == "GET":
            return self._search_customers(params)
        if len(parts) == 3 and kind == "payment_intents" and parts[2] == "cancel":
            pi = self.get("payment_intents", oid)
            pi["status"] = "canceled"
            return copy.deepcopy(pi)
        if method == "POST":
            obj = self.get(kind, oid)
            for name, value in params.items():
                if name == "metadata":
                    obj.setdefault("metadata", {}).update(value)
                elif name not in ("expand",):
                    obj[name] = value
            return copy.deepcopy(obj)
        return self.view(kind, oid)

    # ---- billing meters -------------------------------------------------------------------------------

    def add_meter(self, event_name: str, *, display_name: str | None = None) -> dict[str, Any]:
        """A meter summing `payload[value]` by `payload[stripe_customer_id]`, as the Dashboard makes one."""
        with self.lock:
            meter = {
                "id": f"mtr_{next(self._ids):06d}", "object": "billing.meter", "event_name": event_name,
                "display_name": display_name or event_name, "status": "active", "default_aggregation": {"formula": "sum"},
                "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
                "value_settings": {"event_payload_key": "value"}, "created": int(time.time()),
            }  # fmt: skip
            self.meters[meter["id"]] = meter
            return copy.deepcopy(meter)

    def metered_total(self, event_name: str, customer: str) -> float:
        """What Stripe would bill: the sum of the values of the accepted events of a meter and customer."""
        with self.lock:
            return sum(float(e["payload"]["value"]) for e in self.meter_events
                       if e["event_name"] == event_name and e["payload"]["stripe_customer_id"] == customer)  # fmt: skip

    def _metering(self, method: str, parts: list[str], params: dict[str, Any]) -> dict[str, Any]:
        if parts == ["meter_events"] and method == "POST":
            return self._meter_event(params)
        if parts == ["meters"]:
            if method == "POST":
                return self.add_meter(params["event_name"], display_name=params.get("display_name"))
            return self._page(list(self.meters.values()), params, "/v1/billing/meters")
        meter = self.meters.get(parts[1])
        if meter is None:
            raise StripeError(404, {"error": {"type": "invalid_request_error", "code": "resource_missing",
                                              "message": f"No such billing meter: '{parts[1]}'"}})  # fmt: skip
        if len(parts) == 3 and parts[2] == "event_summaries" and method == "GET":
            return self._event_summaries(meter, params)
        return copy.deepcopy(meter)

    def _meter_event(self, params: dict[str, Any]) -> dict[str, Any]:
        """A v1 meter event: a refusal (a duplicate identifier too) is the answer, a 400."""
        return self._accept(params.get("event_name"), params.get("identifier"), params.get("payload") or {},
                            int(params["timestamp"]) if params.get("timestamp") else None)  # fmt: skip

    def _accept(self, name: Any, identifier: Any, payload: dict[str, Any], timestamp: int | None) -> dict[str, Any]:
        """Stripe's checks of a meter event (either API), and its identifier de-duplicated across both: one
        it has is refused (StripeError, a 400)."""
        if not any(m["event_name"] == name and m["status"] == "active" for m in self.meters.values()):
            raise StripeError(400, {"error": {"type": "invalid_request_error", "message": f"No active meter was found for event name {name}."}})
        value = str(payload.get("value", ""))
        if not re.fullmatch(r"\d+(\.\d+)?", value) or "stripe_customer_id" not in payload:
            raise StripeError(400, {"error": {"type": "invalid_request_error", "message": "payload needs value (a number) and stripe_customer_id."}})
        self.get("customers", payload["stripe_customer_id"])
        identifier = identifier or f"auto_{uuid.uuid4().hex}"
        if identifier in self.meter_identifiers:
            self.duplicate_meter_events += 1
            raise StripeError(400, {"error": {"type": "invalid_request_error", "code": "duplicate_meter_event",
                                              "message": f"An event already exists with identifier {identifier}."}})  # fmt: skip
        event = {"object": "billing.meter_event", "created": int(time.time()), "event_name": name, "identifier": identifier,
                 "livemode": False, "payload": dict(payload), "timestamp": timestamp or int(time.time())}  # fmt: skip
        self.meter_identifiers.add(identifier)
        self.meter_events.append(event)
        return copy.deepcopy(event)

    def _event_summaries(self, meter: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """One summary of the customer's events within [start_time, end_time) (no value_grouping_window)."""
        customer = params.get("customer")
        try:
            start, end = int(params["start_time"]), int(params["end_time"])
        except (KeyError, ValueError):
            raise StripeError(400, {"error": {"type": "invalid_request_error", "message": "customer, start_time and end_time are required."}}) from None
        if not customer or start % 60 or end % 60:
            raise StripeError(400, {"error": {"type": "invalid_request_error",
                                              "message": "start_time and end_time must be aligned with minute boundaries."}})  # fmt: skip
        total = sum(float(e["payload"]["value"]) for e in self.meter_events
                    if e["event_name"] == meter["event_name"] and e["payload"]["stripe_customer_id"] == customer
                    and start <= e["timestamp"] < end)  # fmt: skip
        summary = {"id": f"mtrusg_{meter['id']}_{customer}_{start}", "object": "billing.meter_event_summary",
                   "aggregated_value": total, "start_time": start, "end_time": end, "livemode": False, "meter": meter["id"]}  # fmt: skip
        return self._page([summary], params, f"/v1/billing/meters/{meter['id']}/event_summaries")

    def _create(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        params.pop("expand", None)
        if kind == "prices":
            key = params.get("lookup_key")
            if key and any(p.get("lookup_key") == key and p.get("active") for p in self.db["prices"].values()):
                raise StripeError(400, {"error": {"type": "invalid_request_error",
                                                  "message": f"A price (`{key}`) already uses that lookup key."}})
            self.get("products", params["product"])
            recurring = params.get("recurring")
            if recurring:
                recurring.setdefault("interval_count", 1)
            return self.put("prices", {"active": True, "metadata": {}, "lookup_key": None, "recurring": None, **params})
        if kind == "products":
            return self.put("products", {"active": True, "metadata": {}, "description": None, **params})
        if kind == "customers":
            return self.put("customers", {"metadata": {}, "invoice_settings": {"default_payment_method": None},
                                          "deleted": False, **params})
        if kind == "payment_intents":
            return self._create_intent(params)
        raise StripeError(400, {"error": {"type": "invalid_request_error", "message": f"cannot create {kind} here"}})

    def _create_feature(self, params: dict[str, Any]) -> dict[str, Any]:
        if any(f["lookup_key"] == params["lookup_key"] for f in self.db["features"].values()):
            raise StripeError(400, {"error": {"type": "invalid_request_error", "message": "lookup_key already in use"}})
        return self.put("features", {"active": True, "metadata": {}, **params})

    def _create_intent(self, params: dict[str, Any]) -> dict[str, Any]:
        method = params.get("payment_method")
        outcome = self.card_outcomes[method].pop(0) if method and self.card_outcomes[method] else "succeed"
        if outcome == "succeed" and params.get("confirm"):
            pi = self._succeed_intent(params["amount"], params["currency"], params.get("customer"), params.get("metadata") or {})
            pi.update(payment_method=method, off_session=params.get("off_session"), description=params.get("description"))
            return copy.deepcopy(pi)
        pi = self.put("payment_intents", {"amount": params["amount"], "currency": params["currency"],
                                          "customer": params.get("customer"), "metadata": params.get("metadata") or {},
                                          "payment_method": method, "amount_received": 0})
        if outcome == "requires_action":
            pi.update(status="requires_action", next_action={"type": "use_stripe_sdk"})
            return copy.deepcopy(pi)
        error = {"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds",
                 "message": "Your card has insufficient funds."}
        pi.update(status="requires_payment_method", last_payment_error=error)
        raise StripeError(402, {"error": {**error, "payment_intent": copy.deepcopy(pi)}})

    def _create_session(self, params: dict[str, Any]) -> dict[str, Any]:
        total, currency = 0, "usd"
        for item in params.get("line_items") or []:
            if "price" in item:
                price = self.get("prices", item["price"])
                amount, currency = price["unit_amount"], price["currency"]
            else:
                amount, currency = int(item["price_data"]["unit_amount"]), item["price_data"]["currency"]
            total += amount * int(item.get("quantity") or 1)
        session = self.put("checkout_sessions", {
            "mode": params.get("mode"), "customer": params.get("customer"), "metadata": params.get("metadata") or {},
            "payment_intent_data": params.get("payment_intent_data") or {}, "line_items_sent": params.get("line_items"),
            "amount_total": total, "currency": currency, "status": "open", "payment_status": "unpaid",
            "payment_intent": None, "success_url": params.get("success_url"), "cancel_url": params.get("cancel_url"),
            "client_reference_id": params.get("client_reference_id"),
        })
        session["url"] = f"https://checkout.stripe.test/c/pay/{session['id']}"
        return copy.deepcopy(session)

    def _search_customers(self, params: dict[str, Any]) -> dict[str, Any]:
        match = re.fullmatch(r"metadata\['(\w+)'\]:'((?:[^'\\]|\\.)*)'", str(params.get("query", "")))
        if match is None:
            raise StripeError(400, {"error": {"type": "invalid_request_error", "message": "unsupported search query"}})
        key, value = match[1], re.sub(r"\\(.)", r"\1", match[2])
        found = [copy.deepcopy(c) for c in self.db["customers"].values() if (c.get("metadata") or {}).get(key) == value]
        return {"object": "search_result", "data": found, "has_more": False, "next_page": None, "url": "/v1/customers/search"}

    def _active_entitlements(self, params: dict[str, Any]) -> dict[str, Any]:
        customer = params.get("customer")
        items = [
            {"id": f"ent_{customer}_{key}", "object": "entitlements.active_entitlement", "lookup_key": key,
             "feature": f"feat_{key}", "livemode": False}
            for key in self.entitlements.get(str(customer), [])
        ]
        return self._page(items, params, "/v1/entitlements/active_entitlements")

    def _list(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        items = [copy.deepcopy(o) for o in self.db[kind].values()]
        for name in ("customer", "payment_intent", "product", "charge"):
            if name in params:
                items = [o for o in items if o.get(name) == params[name]]
        if "active" in params:
            items = [o for o in items if o.get("active", True) == params["active"]]
        if "lookup_keys" in params:
            keys = set(params["lookup_keys"])
            items = [o for o in items if o.get("lookup_key") in keys]
        if kind == "subscriptions" and params.get("status") != "all":
            wanted = params.get("status")
            items = [o for o in items if (o["status"] == wanted if wanted else o["status"] != "canceled")]
        created = params.get("created")
        if isinstance(created, dict):
            items = [o for o in items if o["created"] >= int(created.get("gte", 0))]
        items.sort(key=lambda o: (-o["created"], o["id"]))
        return self._page(items, params, f"/v1/{kind}")

    def _page(self, items: list[dict[str, Any]], params: dict[str, Any], url: str) -> dict[str, Any]:
        limit = int(params.get("limit") or 10)
        after = params.get("starting_after")
        if after:
            ids = [o["id"] for o in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        return {"object": "list", "data": items[:limit], "has_more": len(items) > limit, "url": url}
