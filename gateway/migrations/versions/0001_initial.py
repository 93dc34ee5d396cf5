"""The record's first schema: keys, plans, Stripe, credit grants, snapshots, usage, the event outbox.

Revision ID: 0001_initial
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

# Written out rather than imported from gateway.store.db: a migration stays what it was when released.
Text, Int = sa.Text, sa.BigInteger
Time = sa.DateTime(timezone=True)
ZERO = sa.text("0")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", Text, nullable=False),
        sa.Column("billable", Text, nullable=False),
        sa.Column("name", Text, nullable=False, server_default=""),
        sa.Column("hash", Text, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("last_used_at", Time),
        sa.Column("revoked_at", Time),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("hash", name="uq_api_keys_hash"),
    )
    op.create_index("ix_api_keys_billable", "api_keys", ["billable"])

    op.create_table(
        "plan_assignments",
        sa.Column("billable", Text, nullable=False),
        sa.Column("plan", Text, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("billable", name="pk_plan_assignments"),
    )

    op.create_table(
        "stripe_customers",
        sa.Column("customer", Text, nullable=False),
        sa.Column("billable", Text, nullable=False),
        sa.PrimaryKeyConstraint("customer", name="pk_stripe_customers"),
        sa.UniqueConstraint("billable", name="uq_stripe_customers_billable"),
    )

    op.create_table(
        "subscriptions",
        sa.Column("id", Text, nullable=False),
        sa.Column("billable", Text),
        sa.Column("customer", Text, nullable=False),
        sa.Column("plan", Text),
        sa.Column("status", Text, nullable=False),
        sa.Column("current_period_start", Time),
        sa.Column("current_period_end", Time),
        sa.Column("cancel_at_period_end", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("past_due_since", Time),
        sa.Column("updated_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_subscriptions"),
    )
    op.create_index("ix_subscriptions_billable", "subscriptions", ["billable"])

    op.create_table(
        "credit_grants",
        sa.Column("billable", Text, nullable=False),
        sa.Column("seq", Int, nullable=False, autoincrement=False),
        sa.Column("amount", Int, nullable=False),
        sa.Column("reason", Text, nullable=False, server_default=""),
        sa.Column("idempotency_key", Text, nullable=False),
        sa.Column("amount_cents", Int, nullable=False, server_default=ZERO),
        sa.Column("source", Text, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("applied_at", Time),
        sa.PrimaryKeyConstraint("billable", "seq", name="pk_credit_grants"),
        sa.UniqueConstraint("idempotency_key", name="uq_credit_grants_idempotency_key"),
    )
    op.create_index("ix_credit_grants_billable_applied_at", "credit_grants", ["billable", "applied_at"])

    op.create_table(
        "grant_sequences",
        sa.Column("billable", Text, nullable=False),
        sa.Column("last_seq", Int, nullable=False, server_default=ZERO),
        sa.PrimaryKeyConstraint("billable", name="pk_grant_sequences"),
    )

    op.create_table(
        "snapshots",
        sa.Column("billable", Text, nullable=False),
        sa.Column("state", Text, nullable=False),
        sa.Column("chg", Int, nullable=False, server_default=ZERO),
        sa.Column("updated_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("billable", name="pk_snapshots"),
    )

    op.create_table(
        "usage_totals",
        sa.Column("billable", Text, nullable=False),
        sa.Column("period", Text, nullable=False),
        sa.Column("route", Text, nullable=False),
        sa.Column("operation", Text, nullable=False),
        sa.Column("requests", Int, nullable=False, server_default=ZERO),
        sa.Column("units", Int, nullable=False, server_default=ZERO),
        sa.Column("credits", Int, nullable=False, server_default=ZERO),
        sa.Column("amount_cents", Int, nullable=False, server_default=ZERO),
        sa.PrimaryKeyConstraint("billable", "period", "route", "operation", name="pk_usage_totals"),
    )

    op.create_table(
        "events_outbox",
        sa.Column("id", Text, nullable=False),
        sa.Column("billable", Text, nullable=False),
        sa.Column("type", Text, nullable=False),
        sa.Column("body", Text, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=ZERO),
        sa.Column("next_attempt_at", Time, nullable=False),
        sa.Column("delivered_at", Time),
        sa.Column("dead_at", Time),
        sa.Column("last_error", Text),
        sa.PrimaryKeyConstraint("id", name="pk_events_outbox"),
    )
    undelivered = sa.text("delivered_at IS NULL AND dead_at IS NULL")
    op.create_index(
        "ix_events_outbox_due",
        "events_outbox",
        ["next_attempt_at"],
        postgresql_where=undelivered,
        sqlite_where=undelivered,
    )

    op.create_table(
        "stripe_events",
        sa.Column("id", Text, nullable=False),
        sa.Column("type", Text, nullable=False),
        sa.Column("processed_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_stripe_events"),
    )

    op.create_table(
        "settings",
        sa.Column("key", Text, nullable=False),
        sa.Column("value", Text, nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_settings"),
    )


def downgrade() -> None:
    for table in (
        "settings",
        "stripe_events",
        "events_outbox",
        "usage_totals",
        "snapshots",
        "grant_sequences",
        "credit_grants",
        "subscriptions",
        "stripe_customers",
        "plan_assignments",
        "api_keys",
    ):
        op.drop_table(table)
