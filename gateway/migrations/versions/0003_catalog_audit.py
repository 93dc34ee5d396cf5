"""Published catalogs (every version, with who published it) and the audit log of admin and CLI changes.

Revision ID: 0003_catalog_audit
Revises: 0002_billing
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_catalog_audit"
down_revision = "0002_billing"
branch_labels = None
depends_on = None

# Written out rather than imported from gateway.store.db: a migration stays what it was when released.
Text, Int = sa.Text, sa.BigInteger
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "catalog_versions",
        sa.Column("version", Int, nullable=False, autoincrement=False),
        sa.Column("text", Text, nullable=False),
        sa.Column("sha256", Text, nullable=False),
        sa.Column("published_at", Time, nullable=False),
        sa.Column("token", Text, nullable=False),
        sa.PrimaryKeyConstraint("version", name="pk_catalog_versions"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", Int().with_variant(sa.Integer, "sqlite"), nullable=False, autoincrement=True),
        sa.Column("at", Time, nullable=False),
        sa.Column("token", Text, nullable=False),
        sa.Column("action", Text, nullable=False),
        sa.Column("billable", Text),
        sa.Column("before", Text),
        sa.Column("after", Text),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_billable_at", "audit_log", ["billable", "at"])
    op.create_index("ix_audit_log_at", "audit_log", ["at"])


def downgrade() -> None:
    op.drop_index("ix_audit_log_at", table_name="audit_log")
    op.drop_index("ix_audit_log_billable_at", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_table("catalog_versions")
