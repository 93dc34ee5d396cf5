"""Billed units on their way to Stripe: each meter's count per window as last taken, and the outbox of
their increases per (billable, meter, minute), one meter event each.

Revision ID: 0009_meter_outbox
Revises: 0008_members
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_meter_outbox"
down_revision = "0008_members"
branch_labels = None
depends_on = None

# Written out rather than imported from gateway.store.db: a migration stays what it was when released.
Text = sa.Text
Int = sa.BigInteger
Time = sa.DateTime(timezone=True)
ZERO = sa.text("0")


def upgrade() -> None:
    op.create_table(
        "meter_totals",
        sa.Column("billable", Text, nullable=False),
        sa.Column("meter", Text, nullable=False),
        sa.Column("window", Int, nullable=False, autoincrement=False),
        sa.Column("units", Int, nullable=False, server_default=ZERO),
        sa.PrimaryKeyConstraint("billable", "meter", "window", name="pk_meter_totals"),
    )
    op.create_table(
        "meter_outbox",
        sa.Column("billable", Text, nullable=False),
        sa.Column("meter", Text, nullable=False),
        sa.Column("minute", Int, nullable=False, autoincrement=False),
        sa.Column("units", Int, nullable=False, server_default=ZERO),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=ZERO),
        sa.Column("next_attempt_at", Time, nullable=False),
        sa.Column("sent_at", Time),
        sa.Column("last_error", Text),
        sa.PrimaryKeyConstraint("billable", "meter", "minute", name="pk_meter_outbox"),
    )
    unsent = sa.text("sent_at IS NULL")
    op.create_index("ix_meter_outbox_due", "meter_outbox", ["next_attempt_at"], postgresql_where=unsent, sqlite_where=unsent)


def downgrade() -> None:
    op.drop_index("ix_meter_outbox_due", table_name="meter_outbox")
    op.drop_table("meter_outbox")
    op.drop_table("meter_totals")
