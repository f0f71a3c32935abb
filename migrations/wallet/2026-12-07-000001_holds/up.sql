-- Funds held for an order between its admission and its settlement
-- (authorize, then capture or void). The available balance is the balance
-- less what is held; both are columns of the account, so every rule is a
-- constraint or a conditional update on one row:
-- - a hold takes only what is available: `UPDATE … WHERE balance_minor - held_minor >= amount`;
-- - held money cannot be spent twice: debits also need `balance_minor - held_minor >= amount`,
--   and `held_minor <= balance_minor` is a CHECK besides;
-- - a hold ends once: `open` → `captured` | `voided` | `expired` by `UPDATE … WHERE state = 'open'`,
--   so a capture racing the expiry sweeper has exactly one winner.
ALTER TABLE accounts
    ADD COLUMN held_minor BIGINT NOT NULL DEFAULT 0 CHECK (held_minor >= 0),
    ADD CONSTRAINT accounts_held_within_balance CHECK (held_minor <= balance_minor);

CREATE TABLE holds (
    -- The order the money is held for: one hold per order, ever.
    order_id     TEXT        PRIMARY KEY CHECK (char_length(order_id) BETWEEN 1 AND 128),
    user_id      TEXT        NOT NULL,
    currency     TEXT        NOT NULL,
    amount_minor BIGINT      NOT NULL CHECK (amount_minor > 0),
    reference    TEXT        NOT NULL DEFAULT '' CHECK (char_length(reference) <= 256),
    -- `voided` without a hold entry: a void that came first (the caller gave up
    -- on a Hold whose answer it never got); the late Hold then finds it and
    -- holds nothing.
    state        TEXT        NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'captured', 'voided', 'expired')),
    expires_at   TIMESTAMPTZ NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    closed_at    TIMESTAMPTZ,
    CHECK ((state = 'open') = (closed_at IS NULL))
);

-- The sweeper's scan: open holds by expiry.
CREATE INDEX holds_open_by_expiry ON holds (expires_at) WHERE state = 'open';

-- The ledger records every hold, capture and release (a void or an expiry) as
-- well, with the held amount after it, so replaying an account's entries in
-- order reproduces both its balance and what it holds. A capture's key is the
-- order id, the key a debit of the same order would use, so an order is
-- charged at most once whichever way (one outcome per key).
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_check;
ALTER TABLE ledger_entries
    ADD CONSTRAINT ledger_entries_kind_check CHECK (kind IN ('credit', 'debit', 'hold', 'capture', 'release')),
    ADD COLUMN held_after_minor BIGINT CHECK (held_after_minor >= 0),
    ADD CONSTRAINT ledger_entries_held_after_of_holds
        CHECK ((kind IN ('hold', 'capture', 'release')) = (held_after_minor IS NOT NULL));

ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_kind_check;
ALTER TABLE idempotency_keys
    ADD CONSTRAINT idempotency_keys_kind_check CHECK (kind IN ('credit', 'debit', 'capture'));
