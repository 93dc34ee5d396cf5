"""The owner of a billable's Redis state: its keys, every field and its encoding, every script's protocol.

Nothing outside this package names a key or a field; the engine builds the scripts' arguments with the
types here and reads their replies with them (DESIGN §7)."""

from gateway.state.changes import GrantArgs, GrantReply, Update
from gateway.state.decide import CreditReply, DecideArgs, DecideReply, Missing, Seen, Stale
from gateway.state.events import EventBatch, iso, script_event
from gateway.state.feeds import (
    AckArgs,
    RevocationsReply,
    RevokeArgs,
    announce_argv,
    forget_argv,
    revocations_argv,
)
from gateway.state.fields import (
    CHANGE_FIELD,
    HOLD_EXPIRY_FIELD,
    Recharge,
    Snapshot,
    Subscription,
    UsageCounter,
    billed_counters,
    counted_fields,
    grant_sequence,
    ms,
    past_counters,
    restorable,
    usage_counters,
    usage_key,
)
from gateway.state.hold import HeldLimit, Hold, StoredHold
from gateway.state.keys import (
    PREFIX,
    Keys,
    billable_of,
    catalog_key,
    keys,
    member_key,
    pattern,
    probe_key,
    revocation_keys,
)
from gateway.state.restore import Restored, RestoreReply
from gateway.state.settle import CloseArgs, CloseReply, ReleaseArgs, SettleArgs, SettleReply
from gateway.state.spec import CreditSpec, LimitSpec, RateSpec, Spec
from gateway.state.status import LimitStatus, RateStatus, StatusArgs, StatusLimit, StatusReply, StatusSpec

__all__ = [
    "CHANGE_FIELD",
    "HOLD_EXPIRY_FIELD",
    "PREFIX",
    "AckArgs",
    "CloseArgs",
    "CloseReply",
    "CreditReply",
    "CreditSpec",
    "DecideArgs",
    "DecideReply",
    "EventBatch",
    "GrantArgs",
    "GrantReply",
    "HeldLimit",
    "Hold",
    "Keys",
    "LimitSpec",
    "LimitStatus",
    "Missing",
    "RateSpec",
    "RateStatus",
    "Recharge",
    "ReleaseArgs",
    "RestoreReply",
    "Restored",
    "RevocationsReply",
    "RevokeArgs",
    "Seen",
    "SettleArgs",
    "SettleReply",
    "Snapshot",
    "Spec",
    "Stale",
    "StatusArgs",
    "StatusLimit",
    "StatusReply",
    "StatusSpec",
    "StoredHold",
    "Subscription",
    "Update",
    "UsageCounter",
    "announce_argv",
    "billable_of",
    "billed_counters",
    "catalog_key",
    "counted_fields",
    "forget_argv",
    "grant_sequence",
    "iso",
    "keys",
    "member_key",
    "ms",
    "past_counters",
    "pattern",
    "probe_key",
    "restorable",
    "revocation_keys",
    "revocations_argv",
    "script_event",
    "usage_counters",
    "usage_key",
]  # fmt: skip
