-- Wallet: one account per (user, currency) and an append-only ledger.
-- Every invariant that protects money is a constraint here, not only Rust code.

CREATE TABLE accounts (
    user_id       TEXT        NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 128),
    -- ISO 4217 alphabetic code; the service also checks it against the ISO list.
    currency      TEXT        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- Integer minor units. Never negative: a debit that would overdraw matches no row.
    balance_minor BIGINT      NOT NULL DEFAULT 0 CHECK (balance_minor >= 0),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, currency)
);

CREATE TABLE ledger_entries (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- One money movement per key: a retried Debit/Credit can never apply twice.
    idempotency_key     TEXT        NOT NULL UNIQUE CHECK (char_length(idempotency_key) BETWEEN 1 AND 128),
    user_id             TEXT        NOT NULL,
    currency            TEXT        NOT NULL,
    kind                TEXT        NOT NULL CHECK (kind IN ('credit', 'debit')),
    amount_minor        BIGINT      NOT NULL CHECK (amount_minor > 0),
    balance_after_minor BIGINT      NOT NULL CHECK (balance_after_minor >= 0),
    reference           TEXT        NOT NULL DEFAULT '' CHECK (char_length(reference) <= 256),
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    FOREIGN KEY (user_id, currency) REFERENCES accounts (user_id, currency)
);

-- ListTransactions pages a user's ledger newest first.
CREATE INDEX ledger_entries_user_id_id ON ledger_entries (user_id, id DESC);

-- The ledger is append-only: history is corrected by new entries, never edited.
CREATE FUNCTION ledger_entries_forbid_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER ledger_entries_append_only
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_forbid_change();

CREATE TRIGGER ledger_entries_no_truncate
    BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_forbid_change();
