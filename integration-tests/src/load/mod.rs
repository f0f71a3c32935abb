//! The load generator behind `flashsale-load`: seeding a sale, driving buyers at
//! it (open loop by arrival rate, or closed loop by concurrent users), and
//! summarising what happened in Artillery's shape.

pub mod buckets;
pub mod chart;
pub mod queue;
pub mod run;
pub mod seed;
pub mod stats;

use std::time::Duration;

/// Parses `30s`, `2m`, `1h`, `500ms`.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{raw:?}: expected e.g. 500ms, 30s, 2m"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{raw:?}: unit must be ms, s, m or h")),
    })
}

/// One open-loop phase: `duration@rate` or `duration@from-to` (a linear ramp),
/// rates in arrivals per second, e.g. `30s@5`, `60s@5-100`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase {
    pub duration: Duration,
    pub from_rate: f64,
    pub to_rate: f64,
}

impl std::str::FromStr for Phase {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let (duration, rates) = raw.split_once('@').ok_or_else(|| format!("{raw:?}: expected DURATION@RATE"))?;
        let duration = parse_duration(duration)?;
        let rate = |r: &str| r.parse::<f64>().ok().filter(|r| *r >= 0.0).ok_or_else(|| format!("{raw:?}: bad rate"));
        let (from_rate, to_rate) = match rates.split_once('-') {
            Some((from, to)) => (rate(from)?, rate(to)?),
            None => (rate(rates)?, rate(rates)?),
        };
        Ok(Self { duration, from_rate, to_rate })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_parse_constant_rates_and_ramps() {
        assert_eq!(
            "30s@5".parse::<Phase>().unwrap(),
            Phase { duration: Duration::from_secs(30), from_rate: 5.0, to_rate: 5.0 }
        );
        assert_eq!(
            "1m@5-100".parse::<Phase>().unwrap(),
            Phase { duration: Duration::from_secs(60), from_rate: 5.0, to_rate: 100.0 }
        );
        assert!("30s".parse::<Phase>().is_err());
        assert!("x@5".parse::<Phase>().is_err());
        assert!("30s@-3".parse::<Phase>().is_err());
    }
}
