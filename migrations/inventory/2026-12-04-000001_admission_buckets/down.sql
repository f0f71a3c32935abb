ALTER TABLE items DROP COLUMN admission_buckets;
