-- A hold in one statement, so the wallet's Hold call costs one round trip and
-- plans PostgreSQL caches for the session, instead of four statements in six
-- round trips that were parsed and planned on every call. The rules are the
-- ones the holds migration states; this only moves the hold's steps here, in
-- the same order:
-- 1. the hold's row first (one hold per order, ever: a second Hold of the
--    order, or a void that came first, leaves it as it is; the caller reads
--    it and answers from it);
-- 2. then the account, held only if what is available covers the amount;
-- 3. then the order's payment key, read after the account's lock was taken:
--    a debit of the order (a copy published before this hold arrived) locks
--    the account before it looks for a hold, so if it did not see this hold it
--    has committed its key by now, and holding would keep money no payment
--    will take;
-- 4. the ledger entry, with the balance and held amount after it.
-- Each statement of a VOLATILE PL/pgSQL function takes a fresh snapshot (READ
-- COMMITTED), so step 3 sees what committed while step 2 waited.
--
-- Refusals raise, so that nothing of the hold is kept (the next migration,
-- hold_refusals_as_outcomes, catches them and answers them as outcomes):
--   'hold_funds: insufficient funds'
--   'hold_funds: paid first: applied' (or another recorded outcome)
-- `outcome` is 'held' (with the hold's expiry) or 'existing' (nothing done).
CREATE FUNCTION hold_funds(
    p_order TEXT,
    p_user TEXT,
    p_currency TEXT,
    p_amount BIGINT,
    p_reference TEXT,
    p_ttl_seconds INTEGER,
    OUT o_outcome TEXT,
    OUT o_expires_at TIMESTAMPTZ
)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_balance BIGINT;
    v_held BIGINT;
    v_decided TEXT;
BEGIN
    INSERT INTO holds (order_id, user_id, currency, amount_minor, reference, expires_at)
    VALUES (p_order, p_user, p_currency, p_amount, p_reference, now() + make_interval(secs => p_ttl_seconds))
    ON CONFLICT DO NOTHING
    RETURNING holds.expires_at INTO o_expires_at;
    IF NOT FOUND THEN
        o_outcome := 'existing';
        RETURN;
    END IF;

    UPDATE accounts
       SET held_minor = accounts.held_minor + p_amount, updated_at = now()
     WHERE accounts.user_id = p_user
       AND accounts.currency = p_currency
       AND accounts.balance_minor - accounts.held_minor >= p_amount
    RETURNING accounts.balance_minor, accounts.held_minor INTO v_balance, v_held;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'hold_funds: insufficient funds';
    END IF;

    SELECT coalesce(k.outcome, '') INTO v_decided
      FROM idempotency_keys k
     WHERE k.idempotency_key = p_order;
    IF FOUND THEN
        RAISE EXCEPTION 'hold_funds: paid first: %', v_decided;
    END IF;

    INSERT INTO ledger_entries
        (idempotency_key, user_id, currency, kind, amount_minor, balance_after_minor, reference, held_after_minor)
    VALUES (p_order || '/hold', p_user, p_currency, 'hold', p_amount, v_balance, p_reference, v_held);
    o_outcome := 'held';
END;
$$;
