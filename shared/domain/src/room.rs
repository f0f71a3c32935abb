//! A waiting room's order, as a public function of a committed secret seed.
//!
//! An item with a waiting room gets a 32-byte seed when it is created. The
//! seed's SHA-256, its *commitment*, is published with the item from then on;
//! the seed itself once the sale has ended. A buyer who joined before the sale
//! opened stands at the place given by its *draw*:
//!
//! ```text
//! draw(seed, item, user) = the first 8 bytes, read as a big-endian integer, of
//!                          HMAC-SHA256(key = seed, message = item id ‖ 0x00 ‖ user id)
//! ```
//!
//! Lower draws stand first; two equal draws (one chance in 2⁶⁴ per pair) are
//! ordered by the user ids' bytes. Nothing else enters: not when a buyer
//! joined, nor how often, nor from where. So a script that joins first, or a
//! thousand times, stands where one join would have put it.
//!
//! Anyone who has the seed, the item id and the list of buyers can recompute
//! every place ([`order`]; the load tool's `verify-queue` command does it from
//! files) and check the seed against the commitment published before the sale
//! ([`Seed::matches`]). HMAC keyed by the seed is a pseudo-random function of
//! the user id to anyone who does not know the seed, so before the seed is out
//! no buyer can pick an id that stands early.

use std::fmt;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::Invalid;

/// Bytes in a seed.
pub const SEED_BYTES: usize = 32;

/// A room's secret seed. Its `Debug` shows only the commitment: the seed must
/// not reach a log before the sale ends.
#[derive(Clone, PartialEq, Eq)]
pub struct Seed([u8; SEED_BYTES]);

impl Seed {
    /// A fresh seed from the thread's cryptographically secure generator
    /// (ChaCha, seeded and reseeded from the operating system).
    #[must_use]
    pub fn generate() -> Self {
        let mut bytes = [0u8; SEED_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    #[must_use]
    pub const fn from_bytes(bytes: [u8; SEED_BYTES]) -> Self {
        Self(bytes)
    }

    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; SEED_BYTES] {
        &self.0
    }

    /// Parses the published form: 64 hexadecimal digits, either case.
    pub fn parse_hex(hex: &str) -> Result<Self, Invalid> {
        const INVALID: Invalid = Invalid { field: "seed", rule: "must be 64 hexadecimal digits" };
        let digits = hex.as_bytes();
        if digits.len() != SEED_BYTES * 2 {
            return Err(INVALID);
        }
        let mut bytes = [0u8; SEED_BYTES];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            let high = char::from(pair[0]).to_digit(16).ok_or(INVALID)?;
            let low = char::from(pair[1]).to_digit(16).ok_or(INVALID)?;
            *byte = u8::try_from(high * 16 + low).map_err(|_| INVALID)?;
        }
        Ok(Self(bytes))
    }

    /// The published form: 64 lowercase hexadecimal digits.
    #[must_use]
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// The commitment published from the item's creation: SHA-256 of the
    /// seed's 32 bytes, in lowercase hexadecimal.
    #[must_use]
    pub fn commitment(&self) -> String {
        to_hex(&Sha256::digest(self.0))
    }

    /// Whether this seed is the one `commitment` was made to (either case).
    #[must_use]
    pub fn matches(&self, commitment: &str) -> bool {
        self.commitment().eq_ignore_ascii_case(commitment)
    }

    /// The buyer's draw in this item's room (see the module's documentation).
    #[must_use]
    pub fn draw(&self, item_id: &str, user_id: &str) -> Draw {
        // HMAC takes a key of any length; a 32-byte key cannot be refused.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            unreachable!("HMAC-SHA256 accepts keys of every length")
        };
        mac.update(item_id.as_bytes());
        mac.update(&[0]);
        mac.update(user_id.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Draw(u64::from_be_bytes(first))
    }
}

impl fmt::Debug for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Seed").field("commitment", &self.commitment()).finish_non_exhaustive()
    }
}

/// Where a buyer stands among those who joined before the sale opened: lower
/// first. Uniform over `u64`, so `fraction` estimates the share of the
/// pre-queue standing ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Draw(pub u64);

impl Draw {
    /// The draw as a fraction of the whole range, in `[0, 1)`.
    #[must_use]
    #[expect(clippy::cast_precision_loss, reason = "an estimate of a share; 53 bits are plenty")]
    pub fn fraction(self) -> f64 {
        self.0 as f64 / 18_446_744_073_709_551_616.0
    }
}

/// One buyer's place in a room's pre-queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place<'a> {
    /// 1 for the first in line.
    pub place: u64,
    pub user_id: &'a str,
    pub draw: Draw,
}

/// The whole pre-queue in order: every distinct buyer once, by draw, ties by
/// user id.
#[must_use]
pub fn order<'a>(seed: &Seed, item_id: &str, users: impl IntoIterator<Item = &'a str>) -> Vec<Place<'a>> {
    let mut drawn: Vec<(Draw, &'a str)> = users.into_iter().map(|user| (seed.draw(item_id, user), user)).collect();
    drawn.sort_unstable();
    drawn.dedup();
    drawn.into_iter().zip(1..).map(|((draw, user_id), place)| Place { place, user_id, draw }).collect()
}

fn to_hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counting_seed() -> Seed {
        let mut bytes = [0u8; SEED_BYTES];
        for (byte, n) in bytes.iter_mut().zip(0u8..) {
            *byte = n;
        }
        Seed::from_bytes(bytes)
    }

    /// The documented function, computed independently (Python's `hmac` and
    /// `hashlib` over the same bytes), so a change of the formula cannot pass.
    #[test]
    fn draws_and_commitment_match_an_independent_computation() {
        let seed = counting_seed();
        assert_eq!(seed.draw("drop", "alice"), Draw(1_458_739_967_055_346_509));
        assert_eq!(seed.draw("drop", "bob"), Draw(10_137_934_549_101_249_454));
        assert_eq!(seed.commitment(), "630dcd2966c4336691125448bbb25b4ff412a49c732db2c8abc1b8581bd710dd");
        assert!(seed.matches("630DCD2966C4336691125448BBB25B4FF412A49C732DB2C8ABC1B8581BD710DD"));
        assert!(!Seed::generate().matches(&seed.commitment()));
    }

    #[test]
    fn the_item_and_the_separator_enter_the_draw() {
        let seed = counting_seed();
        assert_ne!(seed.draw("drop", "alice"), seed.draw("drop2", "alice"));
        // Without the 0x00 between them, ("ab", "c") and ("a", "bc") would draw alike.
        assert_ne!(seed.draw("ab", "c"), seed.draw("a", "bc"));
    }

    #[test]
    fn hex_round_trips_and_refuses_what_is_not_a_seed() {
        let seed = Seed::generate();
        assert_eq!(Seed::parse_hex(&seed.to_hex()), Ok(seed.clone()));
        assert_eq!(Seed::parse_hex(&seed.to_hex().to_uppercase()), Ok(seed));
        for bad in ["", "00", &"0".repeat(63), &"0".repeat(65), &"g".repeat(64), &"é".repeat(32)] {
            assert!(Seed::parse_hex(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_order_is_by_draw_with_each_buyer_once() {
        let seed = counting_seed();
        let users = ["bob", "alice", "carol", "alice", "dave"];
        let places = order(&seed, "drop", users);
        assert_eq!(places.len(), 4);
        assert_eq!(places.iter().map(|p| p.place).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert!(places.windows(2).all(|pair| pair[0].draw < pair[1].draw));
        let alice = places.iter().find(|p| p.user_id == "alice").map(|p| p.draw);
        assert_eq!(alice, Some(seed.draw("drop", "alice")));
        // The order does not depend on the order the buyers came in.
        let mut reversed = users;
        reversed.reverse();
        assert_eq!(order(&seed, "drop", reversed), places);
    }

    #[test]
    fn a_seed_debug_shows_its_commitment_not_itself() {
        let seed = counting_seed();
        let shown = format!("{seed:?}");
        assert!(shown.contains(&seed.commitment()));
        assert!(!shown.contains(&seed.to_hex()));
    }

    #[test]
    fn fractions_span_the_unit_interval() {
        assert!(Draw(0).fraction() == 0.0);
        assert!(Draw(u64::MAX).fraction() <= 1.0);
        assert!((Draw(1 << 63).fraction() - 0.5).abs() < 1e-12);
    }
}
