"""Member state in the record: the state hashes of an org's teams and keys, kept with the org's snapshot.

Revision ID: 0010_member_state
Revises: 0009_meter_outbox
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_member_state"
down_revision = "0009_meter_outbox"
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
