//! The numeric bounds of a sale and of a listing, shared by the service that
//! enforces each one and by the gateway's OpenAPI document, which publishes it.

/// Largest stock of one item (fits PostgreSQL INTEGER with room to spare).
pub const MAX_STOCK: u32 = 1_000_000_000;

/// Largest unit price, in minor units (10^12).
pub const MAX_PRICE_MINOR: i64 = 1_000_000_000_000;

/// Largest per-user limit of an item, and so the most units one purchase may ask for.
pub const MAX_PER_USER_LIMIT: u32 = 1_000;

/// Most Redis slots (stock buckets) one item's admission may be spread over.
pub const MAX_ADMISSION_BUCKETS: u32 = 64;

/// Most entries one page of a listing holds.
pub const MAX_PAGE_SIZE: u32 = 500;

/// The size of a listing's page a caller asked for: 0 means `default`; above
/// [`MAX_PAGE_SIZE`] is refused (`None`, answered as [`PAGE_SIZE_REFUSAL`]).
pub fn page_size(asked: u32, default: u32) -> Option<u32> {
    match asked {
        0 => Some(default),
        1..=MAX_PAGE_SIZE => Some(asked),
        _ => None,
    }
}

/// Why a page size was refused (the `page_size` field violation).
pub const PAGE_SIZE_REFUSAL: &str = "must be at most 500";

/// Longest item name, in characters.
pub const MAX_ITEM_NAME_CHARS: usize = 200;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(page_size(0, 50), Some(50));
        assert_eq!(page_size(MAX_PAGE_SIZE, 50), Some(MAX_PAGE_SIZE));
        assert_eq!(page_size(MAX_PAGE_SIZE + 1, 50), None);
        assert!(PAGE_SIZE_REFUSAL.contains(&MAX_PAGE_SIZE.to_string()));
    }
}
