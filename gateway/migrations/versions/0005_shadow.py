"""Would-be denials admitted in shadow mode, per period, route and operation, beside the usage totals.

Revision ID: 0005_shadow
Revises: 0003_catalog_audit
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_shadow"
down_revision = "0003_catalog_audit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_totals") as batch:
        batch.add_column(sa.Column("shadow_denials", sa.BigInteger, nullable=False, server_default=sa.text("0")))


def downgrade() -> None:
    with op.batch_alter_table("usage_totals") as batch:
        batch.drop_column("shadow_denials")
