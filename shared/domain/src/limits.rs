//! The numeric bounds of a sale and of a listing, shared by the service that
//! enforces each one and by the gateway's OpenAPI document, which publishes it.

/// Largest stock of one item (fits PostgreSQL INTEGER with room to spare).
pub const MAX_STOCK: u32 = 1_000_000_000;

/// Largest unit price, in minor units (10^12).
pub const MAX_PRICE_MINOR: i64 = 1_000_000_000_000;

/// Largest per-user limit of an item, and so the most units one purchase may ask for.
pub const MAX_PER_USER_LIMIT: u32 = 1_000;

/// Most entries one page of a listing holds.
pub const MAX_PAGE_SIZE: u32 = 500;

/// Longest item name, in characters.
pub const MAX_ITEM_NAME_CHARS: usize = 200;
