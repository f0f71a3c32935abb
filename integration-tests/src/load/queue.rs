//! `verify-queue`: recomputes a waiting room's order from the seed published
//! when its sale ended, and checks it against the commitment published before
//! the sale and against the places buyers were told. The order itself is
//! `flashsale_domain::room`'s (documented there, so it can be recomputed
//! with any HMAC-SHA256 tool as well).

use std::collections::BTreeMap;

use flashsale_domain::room::{Draw, Seed, order};

/// What a check found wrong. Every place is checked; the report lists them all.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// `place,user_id,draw` for every buyer, first in line first.
    pub places: Vec<String>,
    /// Human-readable breaches: a seed that does not match its commitment, or
    /// a buyer told a draw other than the seed gives.
    pub breaches: Vec<String>,
}

/// `users`: one user id per line (blank lines ignored). `told`: lines of
/// `user_id,draw` as the room gave them; each must be what the seed gives,
/// and each such buyer must be among `users`.
pub fn verify(
    seed_hex: &str,
    commitment: Option<&str>,
    item_id: &str,
    users: &str,
    told: Option<&str>,
) -> anyhow::Result<Verdict> {
    let seed = Seed::parse_hex(seed_hex.trim()).map_err(|e| anyhow::anyhow!("--seed {}", e.rule))?;
    let mut verdict = Verdict::default();
    if let Some(commitment) = commitment
        && !seed.matches(commitment.trim())
    {
        verdict.breaches.push(format!(
            "the seed's SHA-256 is {}, not the commitment {}",
            seed.commitment(),
            commitment.trim()
        ));
    }
    let users = users.lines().map(str::trim).filter(|line| !line.is_empty());
    let places = order(&seed, item_id, users);
    let by_user: BTreeMap<&str, Draw> = places.iter().map(|place| (place.user_id, place.draw)).collect();
    verdict.places = places.iter().map(|p| format!("{},{},{}", p.place, p.user_id, p.draw.0)).collect();
    for (number, line) in told.unwrap_or_default().lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some((user, draw)) = line.rsplit_once(',') else {
            anyhow::bail!("tickets line {}: expected user_id,draw, got {line:?}", number + 1);
        };
        let draw: u64 =
            draw.trim().parse().map_err(|_| anyhow::anyhow!("tickets line {}: {draw:?} is not a draw", number + 1))?;
        match by_user.get(user.trim()) {
            None => verdict.breaches.push(format!("{user} was told a place but is not among the buyers")),
            Some(expected) if expected.0 != draw => {
                verdict.breaches.push(format!("{user} was told draw {draw}; the seed gives {}", expected.0));
            }
            Some(_) => {}
        }
    }
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_true_order_passes_and_every_lie_is_named() {
        let seed = Seed::generate();
        let users = "carol\nalice\n\nbob\n";
        let alice = seed.draw("drop", "alice").0;
        let bob = seed.draw("drop", "bob").0;
        let told = format!("alice,{alice}\nbob,{bob}\n");
        let verdict = verify(&seed.to_hex(), Some(&seed.commitment()), "drop", users, Some(&told)).unwrap();
        assert_eq!(verdict.breaches, Vec::<String>::new());
        assert_eq!(verdict.places.len(), 3);
        assert!(verdict.places[0].starts_with("1,"));

        let lies = format!("alice,{}\nmallory,{bob}\n", alice ^ 1);
        let verdict = verify(&seed.to_hex(), Some(&Seed::generate().commitment()), "drop", users, Some(&lies)).unwrap();
        assert_eq!(verdict.breaches.len(), 3, "{:?}", verdict.breaches);
        assert!(verdict.breaches[0].contains("not the commitment"));
        assert!(verdict.breaches[1].contains("alice was told"));
        assert!(verdict.breaches[2].contains("mallory"));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_pass() {
        let seed = Seed::generate().to_hex();
        assert!(verify("abc", None, "drop", "alice", None).is_err());
        assert!(verify(&seed, None, "drop", "alice", Some("alice")).is_err());
        assert!(verify(&seed, None, "drop", "alice", Some("alice,x")).is_err());
    }
}
