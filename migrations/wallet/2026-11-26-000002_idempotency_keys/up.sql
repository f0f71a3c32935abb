-- Every Credit and Debit claims its idempotency key first, in the transaction
-- that moves the money, and records how it ended: applied (with its ledger
-- entry) or refused for insufficient funds. A concurrent request with the same
-- key waits on the claim and then replays the recorded outcome, so a refusal
-- sticks to its key: a retry after a top-up cannot turn a refused payment
-- (whose order was already rejected) into a charge.
CREATE TABLE idempotency_keys (
    idempotency_key TEXT        PRIMARY KEY CHECK (char_length(idempotency_key) BETWEEN 1 AND 128),
    user_id         TEXT        NOT NULL,
    currency        TEXT        NOT NULL,
    kind            TEXT        NOT NULL CHECK (kind IN ('credit', 'debit')),
    amount_minor    BIGINT      NOT NULL CHECK (amount_minor > 0),
    reference       TEXT        NOT NULL,
    -- NULL only inside the claiming transaction.
    outcome         TEXT        CHECK (outcome IN ('applied', 'insufficient_funds')),
    ledger_entry_id BIGINT      UNIQUE REFERENCES ledger_entries (id),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((outcome = 'applied') = (ledger_entry_id IS NOT NULL))
);

INSERT INTO idempotency_keys
    (idempotency_key, user_id, currency, kind, amount_minor, reference, outcome, ledger_entry_id, created_at)
SELECT idempotency_key, user_id, currency, kind, amount_minor, reference, 'applied', id, created_at
  FROM ledger_entries;
