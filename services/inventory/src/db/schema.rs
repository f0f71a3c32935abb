// @generated shape of `diesel print-schema` (see diesel.toml) for migrations/inventory.

diesel::table! {
    holdings (item_id, user_id) {
        item_id -> Text,
        user_id -> Text,
        quantity -> Int4,
        max_quantity -> Int4,
    }
}

diesel::table! {
    items (id) {
        id -> Text,
        name -> Text,
        price_currency -> Text,
        price_minor -> Int8,
        stock_total -> Int4,
        stock_remaining -> Int4,
        per_user_limit -> Int4,
        starts_at -> Timestamptz,
        ends_at -> Timestamptz,
        version -> Int8,
        created_at -> Timestamptz,
        admission_buckets -> Int4,
    }
}

diesel::table! {
    orders (id) {
        id -> Uuid,
        user_id -> Text,
        item_id -> Text,
        quantity -> Int4,
        amount_currency -> Text,
        amount_minor -> Int8,
        status -> Text,
        reject_reason -> Text,
        idempotency_key -> Text,
        payment_attempts -> Int4,
        next_attempt_at -> Timestamptz,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        refund_requested_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    outbox (id) {
        id -> Int8,
        routing_key -> Text,
        payload -> Bytea,
        created_at -> Timestamptz,
        traceparent -> Nullable<Text>,
    }
}

diesel::joinable!(holdings -> items (item_id));
diesel::joinable!(orders -> items (item_id));

diesel::allow_tables_to_appear_in_same_query!(holdings, items, orders, outbox);
