-- Redis slots the item's admission is spread over (services/DESIGN.md, "Hot
-- items: stock buckets"). Fixed at creation: the gateway binds each buyer to
-- one by a hash of the user id, so changing it would move buyers' state.
ALTER TABLE items ADD COLUMN admission_buckets INTEGER NOT NULL DEFAULT 1
    CHECK (admission_buckets BETWEEN 1 AND 64);
