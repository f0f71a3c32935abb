DROP INDEX orders_refund_due;
ALTER TABLE orders DROP COLUMN refund_requested_at;
