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

/// Which page of a listing to read: `size` entries from the place `token`
/// names (`None`: from the start). What a token holds is the listing's own
/// business (the last id or key of the page before); clients get it from a
/// `next_page_token` and hand it back unread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub size: i64,
    pub token: Option<T>,
}

impl<T> Page<T> {
    /// The page a request asks for: `size` 0 means `default_size`, above
    /// [`MAX_PAGE_SIZE`] is refused; a `token` that `read` cannot make sense
    /// of is refused as not issued by this service.
    pub fn parse(
        size: u32,
        token: &str,
        default_size: u32,
        read: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Self, crate::Invalid> {
        let size =
            page_size(size, default_size).ok_or(crate::Invalid { field: "page_size", rule: PAGE_SIZE_REFUSAL })?;
        let token = match token {
            "" => None,
            token => Some(
                read(token)
                    .ok_or(crate::Invalid { field: "page_token", rule: "is not a token this service issued" })?,
            ),
        };
        Ok(Self { size: i64::from(size), token })
    }
}

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
