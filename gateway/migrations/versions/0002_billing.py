"""Billing: the Stripe price and trial end of each subscription; the billable a Stripe event touched.

Revision ID: 0002_billing
Revises: 0001_initial
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_billing"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("subscriptions") as batch:
        batch.add_column(sa.Column("price", sa.Text))
        batch.add_column(sa.Column("trial_end", sa.DateTime(timezone=True)))
    with op.batch_alter_table("stripe_events") as batch:
        batch.add_column(sa.Column("billable", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("stripe_events") as batch:
        batch.drop_column("billable")
    with op.batch_alter_table("subscriptions") as batch:
        batch.drop_column("trial_end")
        batch.drop_column("price")
