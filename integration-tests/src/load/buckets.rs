//! `flashsale-load buckets`: admission throughput of one hot item on a Redis
//! Cluster with its stock in 1, 2, 4… buckets. It starts a private 3-master
//! cluster on loopback ports, loads the item's state as a gateway would
//! (`Admission::rebuild` from a snapshot of 10^9 units, so no bucket runs
//! dry), and drives `Admission::admit`, the gateway's own call on its one
//! multiplexed cluster connection, from many concurrent buyers, each a new
//! user (the reserving branch of `admit.lua`, the heaviest). What the gRPC
//! layer adds is measured apart (S1 of `bench.sh`); this isolates what one
//! Redis shard can take for one item, which buckets lift.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flashsale_gateway::admission::{Admission, Admit, Spread};
use flashsale_proto::inventory::v1::StreamAdmissionSnapshotResponse;
use serde::Serialize;

use crate::backing::PrivateRedisCluster;

/// What one bucket count measured.
#[derive(Debug, Clone, Serialize)]
pub struct BucketFigure {
    pub buckets: u32,
    /// Masters holding at least one of the item's buckets.
    pub masters_used: usize,
    pub admissions: u64,
    pub admissions_per_second: f64,
    /// Redis CPU (all masters) per admission, in µs.
    pub redis_cpu_us_per_admission: f64,
    /// The busiest master's share of that CPU (1.0: one shard did all the work).
    pub busiest_master_share: f64,
    /// Derived, not measured: the admissions/s at which the busiest master
    /// would use one whole core, 10^6 / (µs per admission × its share). On a
    /// machine with a core per master (and enough for the client), this is
    /// where the item's admission tops out.
    pub shard_bound_per_second: f64,
}

/// Runs the measurement for each bucket count in `buckets`, `duration` each,
/// with `concurrency` buyers in flight.
pub async fn measure(buckets: &[u32], duration: Duration, concurrency: usize) -> anyhow::Result<Vec<BucketFigure>> {
    let cluster = PrivateRedisCluster::start().await?;
    let urls = cluster.urls();
    let urls: Vec<&str> = urls.split(',').collect();
    let mut figures = Vec::new();
    for &count in buckets {
        // Its bucket tags {hot-drop}, {hot-drop/1}, /2, /3 hash to masters 1, 3,
        // 1, 2 of the cluster's even slot split: 1, 2 and 4 buckets use 1, 2
        // and 3 masters. Each count has a prefix of its own (outside the tag).
        let item = "hot-drop".to_owned();
        let spread = Spread::new(&item, count);
        let prefix = format!("fs-bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let admission = Arc::new(Admission::connect(&urls, true, &prefix).await?);
        // The whole snapshot in one piece: no buyer holds anything yet.
        let snapshot = StreamAdmissionSnapshotResponse {
            item_id: item.clone(),
            stock_remaining: 1_000_000_000,
            per_user_limit: 1,
            item_version: 1,
            complete: true,
            ..Default::default()
        };
        let lease =
            admission.begin_rebuild(spread).await?.ok_or_else(|| anyhow::anyhow!("{item} was loaded already"))?;
        let rebuilt = admission.rebuild(spread, &lease, futures::stream::iter([Ok(snapshot)])).await?;
        anyhow::ensure!(rebuilt == count, "the buckets of {item} were not loaded");
        let masters_used = {
            let prefixes = crate::audit::bucket_prefixes(&prefix, &item, count);
            cluster.masters_of(prefixes.iter().map(|p| format!("{p}:tokens"))).await?.len()
        };
        let before = cluster.master_cpu_seconds().await?;
        let admitted = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let deadline = started + duration;
        let buyers: Vec<_> = (0..concurrency)
            .map(|worker| {
                let (admission, admitted, item) = (admission.clone(), admitted.clone(), item.clone());
                tokio::spawn(async move {
                    let spread = Spread::new(&item, count);
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let (user, order) = (format!("u{worker}-{n}"), format!("o{worker}-{n}"));
                        n += 1;
                        match admission.admit(spread, &user, 1, 1, &order, &order).await? {
                            Admit::Reserved { .. } => admitted.fetch_add(1, Ordering::Relaxed),
                            other => anyhow::bail!("{user} was not admitted: {other:?}"),
                        };
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for buyer in futures::future::join_all(buyers).await {
            buyer??;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let after = cluster.master_cpu_seconds().await?;
        let used: Vec<f64> = after
            .iter()
            .map(|(port, cpu)| cpu - before.iter().find(|(p, _)| p == port).map_or(0.0, |(_, c)| *c))
            .collect();
        let total: f64 = used.iter().sum();
        let admissions = admitted.load(Ordering::Relaxed);
        figures.push(BucketFigure {
            buckets: count,
            masters_used,
            admissions,
            admissions_per_second: admissions as f64 / elapsed,
            redis_cpu_us_per_admission: total * 1e6 / admissions.max(1) as f64,
            busiest_master_share: used.iter().copied().fold(0.0, f64::max) / total.max(f64::EPSILON),
            shard_bound_per_second: 0.0,
        });
        if let Some(figure) = figures.last_mut() {
            let busiest_us = figure.redis_cpu_us_per_admission * figure.busiest_master_share;
            figure.shard_bound_per_second = 1e6 / busiest_us.max(f64::EPSILON);
        }
    }
    Ok(figures)
}
