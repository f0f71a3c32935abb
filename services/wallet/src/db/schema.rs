// @generated shape of `diesel print-schema` (see diesel.toml) for migrations/wallet.

diesel::table! {
    accounts (user_id, currency) {
        user_id -> Text,
        currency -> Text,
        balance_minor -> Int8,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        held_minor -> Int8,
    }
}

diesel::table! {
    ledger_entries (id) {
        id -> Int8,
        idempotency_key -> Text,
        user_id -> Text,
        currency -> Text,
        kind -> Text,
        amount_minor -> Int8,
        balance_after_minor -> Int8,
        reference -> Text,
        created_at -> Timestamptz,
        held_after_minor -> Nullable<Int8>,
    }
}

diesel::table! {
    holds (order_id) {
        order_id -> Text,
        user_id -> Text,
        currency -> Text,
        amount_minor -> Int8,
        reference -> Text,
        state -> Text,
        expires_at -> Timestamptz,
        created_at -> Timestamptz,
        closed_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    idempotency_keys (idempotency_key) {
        idempotency_key -> Text,
        user_id -> Text,
        currency -> Text,
        kind -> Text,
        amount_minor -> Int8,
        reference -> Text,
        outcome -> Nullable<Text>,
        ledger_entry_id -> Nullable<Int8>,
        created_at -> Timestamptz,
    }
}

diesel::joinable!(idempotency_keys -> ledger_entries (ledger_entry_id));

diesel::allow_tables_to_appear_in_same_query!(accounts, holds, idempotency_keys, ledger_entries);
