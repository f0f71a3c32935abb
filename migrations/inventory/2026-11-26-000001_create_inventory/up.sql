-- Inventory: items on sale, orders, per-buyer holdings and the event outbox.
-- PostgreSQL is the judge of every purchase: the guards below hold even if
-- Redis admitted too much.

CREATE TABLE items (
    id              TEXT        PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_-]{1,64}$'),
    name            TEXT        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    price_currency  TEXT        NOT NULL CHECK (price_currency ~ '^[A-Z]{3}$'),
    price_minor     BIGINT      NOT NULL CHECK (price_minor > 0),
    stock_total     INTEGER     NOT NULL CHECK (stock_total >= 0),
    -- No oversell: never below zero, and the decrement is conditional besides.
    stock_remaining INTEGER     NOT NULL CHECK (stock_remaining >= 0 AND stock_remaining <= stock_total),
    per_user_limit  INTEGER     NOT NULL CHECK (per_user_limit >= 1),
    starts_at       TIMESTAMPTZ NOT NULL,
    ends_at         TIMESTAMPTZ NOT NULL,
    -- Bumped by every change of stock or holdings; see OrderEvent.item_version.
    version         BIGINT      NOT NULL DEFAULT 1,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (starts_at < ends_at)
);

CREATE TABLE orders (
    -- UUIDv7 minted by the gateway: a redelivered OrderPlaced is a no-op.
    id              UUID        PRIMARY KEY,
    user_id         TEXT        NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 128),
    item_id         TEXT        NOT NULL REFERENCES items (id),
    quantity        INTEGER     NOT NULL CHECK (quantity > 0),
    amount_currency TEXT        NOT NULL CHECK (amount_currency ~ '^[A-Z]{3}$'),
    amount_minor    BIGINT      NOT NULL CHECK (amount_minor > 0),
    status          TEXT        NOT NULL CHECK (status IN ('PAYMENT_PENDING', 'CONFIRMED', 'REJECTED', 'REFUNDED')),
    reject_reason   TEXT        NOT NULL DEFAULT '',
    idempotency_key TEXT        NOT NULL CHECK (char_length(idempotency_key) BETWEEN 1 AND 128),
    -- Payment retries: the sweeper takes PAYMENT_PENDING orders whose time has come.
    payment_attempts INTEGER    NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((status = 'REJECTED') = (reject_reason <> ''))
);

-- One live order per (buyer, item, idempotency key). Rejected duplicates are
-- kept for the record, which is why the index is partial.
CREATE UNIQUE INDEX orders_one_per_idempotency_key
    ON orders (user_id, item_id, idempotency_key) WHERE status <> 'REJECTED';
CREATE INDEX orders_user_id_id ON orders (user_id, id DESC);
CREATE INDEX orders_item_id_status ON orders (item_id, status);
CREATE INDEX orders_payment_due ON orders (next_attempt_at) WHERE status = 'PAYMENT_PENDING';

-- Units a buyer holds of an item (PAYMENT_PENDING + CONFIRMED orders).
-- No hoarding: max_quantity is the item's per-user limit, copied at insert.
CREATE TABLE holdings (
    item_id      TEXT    NOT NULL REFERENCES items (id),
    user_id      TEXT    NOT NULL,
    quantity     INTEGER NOT NULL,
    max_quantity INTEGER NOT NULL,
    PRIMARY KEY (item_id, user_id),
    CHECK (quantity >= 0 AND quantity <= max_quantity)
);

-- Order events waiting to be published (written in the transaction that
-- changes the order, deleted once RabbitMQ confirms them).
CREATE TABLE outbox (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    routing_key TEXT        NOT NULL,
    payload     BYTEA       NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
