//! Store flags: where People Nearby is held (`--store`), and how to reach Redis / Valkey.

use std::time::Duration;

use anyhow::bail;
use clap::{Args, ValueEnum};

use super::{human::Human, longer_than_zero};
use crate::store::redis::{Credentials, Target};

/// Which store holds People Nearby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum StoreKind {
    /// This process's memory: the default and the fastest; one replica.
    #[default]
    Memory,
    /// One Redis or Valkey server (`--redis-url`), shared by any number of replicas.
    Redis,
    /// A Redis or Valkey Cluster (`--redis-nodes`), shared by any number of replicas.
    RedisCluster,
}

/// Where People Nearby is held; `None` target = in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The Redis / Valkey store, or `None` for memory.
    pub target: Option<Target>,
    /// Longest a store call may take before the request gets UNAVAILABLE.
    pub timeout: Duration,
}

impl Default for StoreConfig {
    /// In memory; a remote store's calls bounded by 500 ms.
    fn default() -> Self {
        Self {
            target: None,
            timeout: Duration::from_millis(500),
        }
    }
}

/// The store's flags; defaults from [`StoreConfig::default`].
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Where People Nearby is held: memory (this process), redis (one Redis or Valkey
    /// server, --redis-url) or redis-cluster (a Redis or Valkey Cluster, --redis-nodes).
    #[arg(long, env = "GEOMATCH_STORE", value_enum, default_value_t = StoreKind::Memory)]
    pub store: StoreKind,

    /// The Redis / Valkey server of --store redis.
    #[arg(
        long,
        env = "GEOMATCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// Seed nodes of the Cluster of --store redis-cluster, as HOST:PORT,HOST:PORT,...
    #[arg(long, env = "GEOMATCH_REDIS_NODES", value_delimiter = ',')]
    pub redis_nodes: Vec<String>,

    /// The ACL user geomatch authenticates as to its Redis / Valkey store (Redis 6 and
    /// later); unset: the `default` user.
    #[arg(long, env = "GEOMATCH_REDIS_USERNAME")]
    pub redis_username: Option<String>,

    /// A file holding the password geomatch authenticates with to its Redis / Valkey store
    /// (its first line; a secret mounted as a file, so the password is not in the
    /// process's arguments or environment). Unset: no password, or the one in
    /// --redis-url.
    #[arg(long, env = "GEOMATCH_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<std::path::PathBuf>,

    /// Longest one store call may take; a request whose store call does not answer in
    /// time gets UNAVAILABLE (never a wrong answer).
    #[arg(long, env = "GEOMATCH_STORE_TIMEOUT", default_value_t = Human(StoreConfig::default().timeout))]
    pub store_timeout: Human,
}

impl StoreArgs {
    /// The store's settings.
    ///
    /// # Errors
    /// When --store redis-cluster has no --redis-nodes, a node is not HOST:PORT, the URL
    /// is not a redis:// or rediss:// URL, --store-timeout is zero, or the
    /// --redis-password-file cannot be read or holds no password.
    pub fn settings(&self) -> anyhow::Result<StoreConfig> {
        longer_than_zero("--store-timeout", self.store_timeout.get())?;
        let target = match self.store {
            StoreKind::Memory => None,
            StoreKind::Redis => {
                let url = self.redis_url.trim();
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    bail!("--redis-url {url:?}: expected redis://HOST:PORT");
                }
                Some(Target::Server(url.to_string(), self.credentials()?))
            }
            StoreKind::RedisCluster => {
                let nodes: Vec<String> = self
                    .redis_nodes
                    .iter()
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
                    .collect();
                if nodes.is_empty() {
                    bail!(
                        "--store redis-cluster: give the seed nodes with --redis-nodes HOST:PORT,..."
                    );
                }
                for n in &nodes {
                    let port = n.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
                    if !matches!(port, Some(Ok(p)) if p > 0) {
                        bail!("--redis-nodes {n:?}: expected HOST:PORT");
                    }
                }
                Some(Target::Cluster(nodes, self.credentials()?))
            }
        };
        Ok(StoreConfig {
            target,
            timeout: self.store_timeout.get(),
        })
    }

    /// The credentials the flags give: the user name as given, the password as the first
    /// line of --redis-password-file, exactly (without its line break). A user name needs
    /// a password: with none, no `AUTH` would be sent and the replica would quietly run
    /// as the `default` user.
    fn credentials(&self) -> anyhow::Result<Credentials> {
        let username = self
            .redis_username
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string);
        let password = match &self.redis_password_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("--redis-password-file {}: {e}", path.display())
                })?;
                let line = text.lines().next().unwrap_or("");
                if line.is_empty() {
                    bail!(
                        "--redis-password-file {}: the file holds no password",
                        path.display()
                    );
                }
                Some(line.to_string())
            }
        };
        if username.is_some() && password.is_none() && !self.url_has_password() {
            bail!(
                "--redis-username needs a password: give it with --redis-password-file \
                 (or in --redis-url)"
            );
        }
        Ok(Credentials { username, password })
    }

    /// Whether --redis-url (of --store redis) holds a password: `redis://user:pw@...`, as
    /// the redis crate reads the URL.
    fn url_has_password(&self) -> bool {
        self.store == StoreKind::Redis
            && redis::IntoConnectionInfo::into_connection_info(self.redis_url.trim()).is_ok_and(
                |info| {
                    info.redis_settings()
                        .password()
                        .is_some_and(|p| !p.is_empty())
                },
            )
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    #[test]
    fn store_flags_pick_the_store_and_check_its_address() {
        let (_, s) = parse(&[]).unwrap();
        assert_eq!(s.store, StoreConfig::default());
        let (_, s) = parse(&["--store", "redis", "--redis-url", "redis://127.0.0.1:7000"]).unwrap();
        assert_eq!(
            s.store.target,
            Some(Target::Server(
                "redis://127.0.0.1:7000".into(),
                Credentials::default()
            ))
        );
        let (_, s) = parse(&[
            "--store",
            "redis-cluster",
            "--redis-nodes",
            "127.0.0.1:7000,127.0.0.1:7001",
        ])
        .unwrap();
        assert_eq!(
            s.store.target,
            Some(Target::Cluster(
                vec!["127.0.0.1:7000".into(), "127.0.0.1:7001".into()],
                Credentials::default()
            ))
        );
        for (args, names) in [
            (vec!["--store", "redis-cluster"], "--redis-nodes"),
            (
                vec!["--store", "redis-cluster", "--redis-nodes", "nohost"],
                "--redis-nodes",
            ),
            (
                vec!["--store", "redis", "--redis-url", "http://x"],
                "--redis-url",
            ),
            (vec!["--store-timeout", "0s"], "--store-timeout 0"),
        ] {
            let err = parse(&args).unwrap_err().to_string();
            assert!(err.contains(names), "{args:?}: {err}");
        }
    }

    #[test]
    fn the_password_comes_from_its_file_and_never_shows() {
        let dir = std::env::temp_dir().join(format!("gm-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, " s3cret \r\nignored\n").unwrap();
        let path = file.to_str().unwrap();
        let (_, s) = parse(&[
            "--store",
            "redis-cluster",
            "--redis-nodes",
            "127.0.0.1:7000",
            "--redis-username",
            "geomatch",
            "--redis-password-file",
            path,
        ])
        .unwrap();
        let target = s.store.target.unwrap();
        let credentials = target.credentials();
        assert_eq!(credentials.username.as_deref(), Some("geomatch"));
        assert_eq!(credentials.password.as_deref(), Some(" s3cret "));
        assert!(!format!("{target:?}").contains("s3cret"), "{target:?}");

        // The memory store reads no file.
        let absent = dir.join("absent");
        let absent = absent.to_str().unwrap();
        assert!(parse(&["--redis-password-file", absent]).is_ok());
        let empty = dir.join("empty");
        let empty = empty.to_str().unwrap();
        std::fs::write(empty, "\n").unwrap();
        let io_error = std::fs::read(absent).unwrap_err().to_string();
        for (file, says) in [(absent, io_error.as_str()), (empty, "no password")] {
            let err = parse(&["--store", "redis", "--redis-password-file", file])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--redis-password-file"), "{err}");
            assert!(err.contains(says), "{err}");
        }

        // A user name without a password would not be sent at all: refused, unless the
        // URL holds the password.
        let user_only = [
            "--store",
            "redis-cluster",
            "--redis-nodes",
            "h:1",
            "--redis-username",
            "u",
        ];
        let err = parse(&user_only).unwrap_err().to_string();
        assert!(err.contains("--redis-username needs a password"), "{err}");
        let url_password = [
            "--store",
            "redis",
            "--redis-url",
            "redis://u:pw@h:1",
            "--redis-username",
            "u",
        ];
        assert!(parse(&url_password).is_ok());
        let url_user_only = [
            "--store",
            "redis",
            "--redis-url",
            "redis://u@h:1",
            "--redis-username",
            "u",
        ];
        assert!(parse(&url_user_only).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
