//! Outcome counts and latency histograms (HdrHistogram), overall and per second.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, 1 µs to 60 s, 3 significant digits.
#[expect(clippy::expect_used, reason = "constant bounds that the library accepts")]
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

#[derive(Debug)]
pub struct Stats {
    pub launched: u64,
    pub completed: u64,
    pub outcomes: BTreeMap<String, u64>,
    latency: Histogram<u64>,
    seconds: Vec<Second>,
}

#[derive(Debug)]
struct Second {
    completed: u64,
    latency: Histogram<u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Self { launched: 0, completed: 0, outcomes: BTreeMap::new(), latency: histogram(), seconds: Vec::new() }
    }
}

impl Stats {
    /// One finished request, `second` seconds after the run started.
    pub fn record(&mut self, second: usize, latency: Duration, outcome: &str) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        self.completed += 1;
        *self.outcomes.entry(outcome.to_owned()).or_default() += 1;
        let _ = self.latency.record(micros.min(self.latency.high()));
        while self.seconds.len() <= second {
            self.seconds.push(Second { completed: 0, latency: histogram() });
        }
        let slot = &mut self.seconds[second];
        slot.completed += 1;
        let _ = slot.latency.record(micros.min(slot.latency.high()));
    }

    pub fn report(&self, elapsed: Duration) -> Report {
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Report {
            launched: self.launched,
            completed: self.completed,
            elapsed_seconds: elapsed.as_secs_f64(),
            mean_rps: self.completed as f64 / elapsed.as_secs_f64().max(f64::EPSILON),
            latency_ms: Latency {
                min: self.latency.min() as f64 / 1000.0,
                median: ms(&self.latency, 0.5),
                p95: ms(&self.latency, 0.95),
                p99: ms(&self.latency, 0.99),
                max: self.latency.max() as f64 / 1000.0,
            },
            outcomes: self.outcomes.clone(),
            timeline: self
                .seconds
                .iter()
                .enumerate()
                .map(|(second, s)| Tick {
                    second,
                    completed: s.completed,
                    p50_ms: ms(&s.latency, 0.5),
                    p95_ms: ms(&s.latency, 0.95),
                    p99_ms: ms(&s.latency, 0.99),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub min: f64,
    pub median: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tick {
    pub second: usize,
    pub completed: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

/// The run's summary, printed and written as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub launched: u64,
    pub completed: u64,
    pub elapsed_seconds: f64,
    pub mean_rps: f64,
    pub latency_ms: Latency,
    pub outcomes: BTreeMap<String, u64>,
    pub timeline: Vec<Tick>,
}

impl Report {
    /// The summary in Artillery's shape.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("Scenarios launched:  {}\n", self.launched));
        out.push_str(&format!("Scenarios completed: {}\n", self.completed));
        out.push_str(&format!("Mean response/sec:   {:.1}\n", self.mean_rps));
        out.push_str("Response time (msec):\n");
        let l = &self.latency_ms;
        for (name, value) in [("min", l.min), ("median", l.median), ("p95", l.p95), ("p99", l.p99), ("max", l.max)] {
            out.push_str(&format!("  {name}: {value:.3}\n"));
        }
        out.push_str("Codes:\n");
        for (outcome, count) in &self.outcomes {
            out.push_str(&format!("  {outcome}: {count}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_counts_outcomes_and_orders_percentiles() {
        let mut stats = Stats::default();
        for ms in 1..=100 {
            stats.record(0, Duration::from_millis(ms), if ms % 2 == 0 { "ACCEPTED" } else { "SOLD_OUT" });
        }
        stats.launched = 100;
        let report = stats.report(Duration::from_secs(2));
        assert_eq!(report.completed, 100);
        assert_eq!(report.outcomes["ACCEPTED"], 50);
        assert!((report.mean_rps - 50.0).abs() < 1e-9);
        let l = &report.latency_ms;
        assert!(l.min <= l.median && l.median <= l.p95 && l.p95 <= l.p99 && l.p99 <= l.max);
        assert!((l.median - 50.0).abs() < 1.0, "median {}", l.median);
        assert_eq!(report.timeline.len(), 1);
        assert!(report.render().contains("SOLD_OUT: 50"));
    }
}
