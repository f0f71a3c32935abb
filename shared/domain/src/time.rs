//! Time on the wire is a `google.protobuf.Timestamp`; inside, the services
//! keep either a `DateTime<Utc>` (PostgreSQL columns) or Unix milliseconds
//! (Redis values, the catalog). These are the only conversions between them.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

use crate::Invalid;

/// Unix milliseconds (negative before 1970) as a `Timestamp`.
pub fn from_ms(ms: i64) -> Timestamp {
    // rem_euclid keeps nanos in 0..1e9 for negative times too, as the type demands.
    Timestamp { seconds: ms.div_euclid(1000), nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0) }
}

/// A `Timestamp` as Unix milliseconds (sub-millisecond digits dropped,
/// saturating far outside any real date).
pub fn to_ms(at: &Timestamp) -> i64 {
    at.seconds.saturating_mul(1000).saturating_add(i64::from(at.nanos.div_euclid(1_000_000)))
}

pub fn from_datetime(at: DateTime<Utc>) -> Timestamp {
    Timestamp { seconds: at.timestamp(), nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0) }
}

/// A client's `Timestamp` as a `DateTime`, refused when its nanos are out of
/// 0..1e9 or the date is outside what `DateTime` holds.
pub fn to_datetime(at: &Timestamp) -> Result<DateTime<Utc>, Invalid> {
    let nanos = u32::try_from(at.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or(Invalid { field: "timestamp", rule: "must have nanos in 0..1e9" })?;
    DateTime::from_timestamp(at.seconds, nanos).ok_or(Invalid { field: "timestamp", rule: "is out of range" })
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_round_trip_both_sides_of_1970() {
        for ms in [0, 1, 999, 1_000, 1_767_225_600_123, -1, -999, -1_000, -1_001] {
            let at = from_ms(ms);
            assert!((0..1_000_000_000).contains(&at.nanos), "{ms}: {at:?}");
            assert_eq!(to_ms(&at), ms);
        }
        assert_eq!(from_ms(-1), Timestamp { seconds: -1, nanos: 999_000_000 });
    }

    #[test]
    fn datetimes_round_trip_and_bad_timestamps_are_refused() {
        let at = DateTime::from_timestamp(1_767_225_600, 123_456_789).unwrap();
        assert_eq!(to_datetime(&from_datetime(at)), Ok(at));
        assert!(to_datetime(&Timestamp { seconds: 0, nanos: -1 }).is_err());
        assert!(to_datetime(&Timestamp { seconds: 0, nanos: 1_000_000_000 }).is_err());
        assert!(to_datetime(&Timestamp { seconds: i64::MAX, nanos: 0 }).is_err());
        assert_eq!(to_ms(&Timestamp { seconds: i64::MAX, nanos: 0 }), i64::MAX);
    }
}
