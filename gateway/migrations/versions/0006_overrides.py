"""Per-billable terms: overrides on top of the plan, and suspensions (the record is their truth).

Revision ID: 0006_overrides
Revises: 0005_shadow
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_overrides"
down_revision = "0005_shadow"
branch_labels = None
depends_on = None

# Written out rather than imported from gateway.store.db: a migration stays what it was when released.
Text = sa.Text
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "billable_overrides",
        sa.Column("billable", Text, nullable=False),
        sa.Column("overrides", Text),
        sa.Column("expires_at", Time),
        sa.Column("suspension", Text),
        sa.Column("suspended_at", Time),
        sa.Column("updated_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("billable", name="pk_billable_overrides"),
    )


def downgrade() -> None:
    op.drop_table("billable_overrides")
