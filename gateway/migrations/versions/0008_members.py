"""Members: a billable's parent (org → team → key) and a member's own terms (gateway.members, gateway.terms).

Revision ID: 0008_members
Revises: 0007_usage_daily
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_members"
down_revision = "0007_usage_daily"
branch_labels = None
depends_on = None

# Written out rather than imported from gateway.store.db: a migration stays what it was when released.
Text = sa.Text
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "billable_members",
        sa.Column("billable", Text, nullable=False),
        sa.Column("parent", Text, nullable=False),
        sa.Column("terms", Text),
        sa.Column("updated_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("billable", name="pk_billable_members"),
    )
    op.create_index("ix_billable_members_parent", "billable_members", ["parent"])


def downgrade() -> None:
    op.drop_index("ix_billable_members_parent", "billable_members")
    op.drop_table("billable_members")
