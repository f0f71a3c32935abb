-- hold_funds answers its refusals as outcomes instead of raising them to the
-- caller. A refusal is the normal answer to a buyer who cannot pay (a fifth of
-- a crowd, say), and an error raised to the client is logged by PostgreSQL
-- with its context and statement: three log lines per refused buyer. The
-- refusals are still raised, to undo the hold's row, but inside a block that
-- catches them (a subtransaction, rolled back), so nothing of the hold is kept
-- and nothing is logged. The steps and their order are unchanged.
-- `o_outcome`: 'held' (with the expiry), 'existing' (nothing done: the order
-- has a hold or a void mark already), 'insufficient_funds', or
-- 'paid_first:<the outcome recorded under the order's key>'.
DROP FUNCTION hold_funds(TEXT, TEXT, TEXT, BIGINT, TEXT, INTEGER);
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
            RAISE EXCEPTION USING ERRCODE = 'FS001', MESSAGE = 'insufficient_funds';
        END IF;

        SELECT coalesce(k.outcome, '') INTO v_decided
          FROM idempotency_keys k
         WHERE k.idempotency_key = p_order;
        IF FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'FS002', MESSAGE = 'paid_first:' || v_decided;
        END IF;

        INSERT INTO ledger_entries
            (idempotency_key, user_id, currency, kind, amount_minor, balance_after_minor, reference, held_after_minor)
        VALUES (p_order || '/hold', p_user, p_currency, 'hold', p_amount, v_balance, p_reference, v_held);
        o_outcome := 'held';
    EXCEPTION
        WHEN SQLSTATE 'FS001' OR SQLSTATE 'FS002' THEN
            o_outcome := SQLERRM;
            o_expires_at := NULL;
    END;
END;
$$;
