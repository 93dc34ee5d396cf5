"""Member state in the record: the state hashes of an org's teams and keys, kept with the org's snapshot.

Revision ID: 0009_member_state
Revises: 0008_members
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_member_state"
down_revision = "0008_members"
branch_labels = None
depends_on = None

# Written out rather than imported from gateway.store.db: a migration stays what it was when released.
Text = sa.Text


def upgrade() -> None:
    with op.batch_alter_table("snapshots") as batch:
        batch.add_column(sa.Column("members", Text))


def downgrade() -> None:
    with op.batch_alter_table("snapshots") as batch:
        batch.drop_column("members")
