DROP TABLE ledger_entries;
DROP FUNCTION ledger_entries_forbid_change();
DROP TABLE accounts;
