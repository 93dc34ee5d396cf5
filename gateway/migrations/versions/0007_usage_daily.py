"""Daily usage: the increase of each usage total, per day of its flush.

Revision ID: 0007_usage_daily
Revises: 0006_overrides
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_usage_daily"
down_revision = "0006_overrides"
branch_labels = None
depends_on = None

# Written out rather than imported from gateway.store.db: a migration stays what it was when released.
Text = sa.Text
Int = sa.BigInteger
ZERO = sa.text("0")


def upgrade() -> None:
    op.create_table(
        "usage_daily",
        sa.Column("billable", Text, nullable=False),
        sa.Column("day", Text, nullable=False),
        sa.Column("route", Text, nullable=False),
        sa.Column("operation", Text, nullable=False),
        sa.Column("requests", Int, nullable=False, server_default=ZERO),
        sa.Column("units", Int, nullable=False, server_default=ZERO),
        sa.Column("credits", Int, nullable=False, server_default=ZERO),
        sa.PrimaryKeyConstraint("billable", "day", "route", "operation", name="pk_usage_daily"),
    )


def downgrade() -> None:
    op.drop_table("usage_daily")
