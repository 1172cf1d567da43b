"""outbox: indexes for per-target queues

The outbox worker walks the targets (webhook endpoints) that have pending rows, then reads each
one's head and the run after it: ix_outbox_queue (status, target, seq, id). Rows without a
target (mail) are claimed longest-due first: ix_outbox_due becomes (status, target,
next_attempt_at), so a webhook backlog is not scanned to find them. ix_outbox_target goes: an
index led by `target` alone tempted PostgreSQL to walk every sent row of an endpoint to find
its pending ones.

Revision ID: 0002_outbox_queue
Revises: 0001
Create Date: 2026-12-04 08:00:00.000000
"""
from __future__ import annotations

from alembic import op

revision = '0002_outbox_queue'  # named, not numbered: other features add parallel heads
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_target')
        batch_op.drop_index('ix_outbox_due')
        batch_op.create_index('ix_outbox_due', ['status', 'target', 'next_attempt_at'],
                              unique=False)
        batch_op.create_index('ix_outbox_queue', ['status', 'target', 'seq', 'id'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_queue')
        batch_op.drop_index('ix_outbox_due')
        batch_op.create_index('ix_outbox_due', ['status', 'next_attempt_at'], unique=False)
        batch_op.create_index('ix_outbox_target', ['target'], unique=False)
