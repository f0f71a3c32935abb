-- A refund is recorded as requested before the wallet is credited, so one
-- interrupted between the credit and the order update is finished by the
-- sweeper (the credit is idempotent by its key) instead of leaving the buyer
-- with both the money and the goods.
ALTER TABLE orders ADD COLUMN refund_requested_at TIMESTAMPTZ;
CREATE INDEX orders_refund_due ON orders (refund_requested_at)
    WHERE status = 'CONFIRMED' AND refund_requested_at IS NOT NULL;
