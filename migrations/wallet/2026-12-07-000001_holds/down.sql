ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_kind_check;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_kind_check CHECK (kind IN ('credit', 'debit'));
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_held_after_of_holds;
ALTER TABLE ledger_entries DROP COLUMN held_after_minor;
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_check;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_check CHECK (kind IN ('credit', 'debit'));
DROP TABLE holds;
ALTER TABLE accounts DROP CONSTRAINT accounts_held_within_balance;
ALTER TABLE accounts DROP COLUMN held_minor;
