//! What a store call costs the client through the redis crate's Cluster client against a
//! multiplexed connection straight to the node that holds the key: the measurement behind
//! `store::redis::direct`. 64 tasks `GET` one key through each in turn, three rounds;
//! printed per round: calls per second and this process's CPU (user + system) per call.
//!
//! ```sh
//! # a Cluster on loopback (the README's "Running a cluster"), then:
//! cargo run --release --example cluster_route -- 127.0.0.1:7100 200000
//! ```

use std::time::Instant;

use redis::AsyncCommands as _;

/// This process's CPU seconds so far (user + system), from /proc.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seed = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7100".into());
    let calls: usize = std::env::args().nth(2).map_or(Ok(200_000), |n| n.parse())?;
    const TASKS: usize = 64;
    let key = "gm1:{85309a6bfffffff}:b:x";
    let cluster = redis::cluster::ClusterClient::new(vec![format!("redis://{seed}")])?
        .get_async_connection()
        .await?;
    // The node that holds the key: the one that answers without a redirect.
    let mut direct = None;
    let nodes: redis::Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut cluster.clone())
        .await?;
    let redis::Value::Array(ranges) = nodes else {
        return Err("CLUSTER SLOTS: not an array".into());
    };
    for range in ranges {
        let redis::Value::Array(parts) = range else {
            continue;
        };
        let Some(redis::Value::Array(master)) = parts.get(2) else {
            continue;
        };
        let (Some(redis::Value::BulkString(host)), Some(redis::Value::Int(port))) =
            (master.first(), master.get(1))
        else {
            continue;
        };
        let url = format!("redis://{}:{port}", String::from_utf8_lossy(host));
        let mut conn = redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        if conn.get::<_, Option<String>>(key).await.is_ok() {
            println!("the key is on {url}");
            direct = Some(conn);
            break;
        }
    }
    let direct = direct.ok_or("no node answered for the key")?;
    for round in 1..=3 {
        for through_cluster in [true, false] {
            let (cpu0, t0) = (cpu_seconds(), Instant::now());
            let mut tasks = Vec::new();
            for _ in 0..TASKS {
                let (mut cluster, mut direct) = (cluster.clone(), direct.clone());
                tasks.push(tokio::spawn(async move {
                    for _ in 0..calls / TASKS {
                        let got: redis::RedisResult<Option<String>> = if through_cluster {
                            cluster.get(key).await
                        } else {
                            direct.get(key).await
                        };
                        got?;
                    }
                    Ok::<(), redis::RedisError>(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            let secs = t0.elapsed().as_secs_f64();
            let cpu = cpu_seconds()
                .zip(cpu0)
                .map(|(b, a)| b - a)
                .unwrap_or(f64::NAN);
            println!(
                "round {round}, {}: {:.0} calls/s, client CPU {:.2} µs per call",
                if through_cluster {
                    "Cluster client"
                } else {
                    "straight to the node"
                },
                calls as f64 / secs,
                cpu * 1e6 / calls as f64
            );
        }
    }
    Ok(())
}
