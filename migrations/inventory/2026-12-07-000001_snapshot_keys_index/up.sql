-- The admission snapshot reads every recorded (buyer, idempotency key) of one
-- item in keyset pages ordered by buyer and key; this index makes each page a
-- range scan instead of a sort of all the item's orders.
CREATE INDEX orders_item_user_key ON orders (item_id, user_id, idempotency_key, id);
