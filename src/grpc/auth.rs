//! Caller authentication and authorization: one tower layer in front of every service.
//!
//! Callers are services (the chat backend, an operator's grpcurl), not end users. A call
//! is made by the caller its bearer token names (`authorization: Bearer <token>`, from
//! `--auth-tokens-file`; tokens are compared in constant time), else by a DNS name of its
//! mutual-TLS certificate that `--authz-file` knows (or, without one, its first). An
//! unknown caller gets UNAUTHENTICATED; a known one PERMISSION_DENIED naming the method it
//! may not call. Both are counted in `geomatch_auth_refusals_total` by caller name, never
//! by token. Health is open to everyone (probes); reflection follows the authz file like
//! any service. The rules are swapped whole when their files change.

use std::{
    collections::HashMap,
    future::Future,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use arc_swap::ArcSwap;
use subtle::ConstantTimeEq as _;
use tonic::{
    Status,
    body::Body,
    codegen::http,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::{Layer, Service};

use crate::telemetry::names;

/// What callers may call: patterns of `service/Method`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// Everything.
    All,
    /// Methods whose `service/Method` starts with this.
    Prefix(String),
    /// One method.
    Exact(String),
}

impl Pattern {
    fn parse(s: &str) -> Self {
        match s.strip_suffix('*') {
            Some("") => Self::All,
            Some(prefix) => Self::Prefix(prefix.to_owned()),
            None => Self::Exact(s.to_owned()),
        }
    }

    fn matches(&self, method: &str) -> bool {
        match self {
            Self::All => true,
            Self::Prefix(p) => method.starts_with(p.as_str()),
            Self::Exact(m) => m == method,
        }
    }
}

/// The rules in force: known tokens and, with an authz file, each caller's grants. The
/// tokens are wiped from memory when a reload replaces the rules.
#[derive(Default)]
pub struct Rules {
    tokens: Vec<(String, zeroize::Zeroizing<Vec<u8>>)>,
    grants: Option<HashMap<String, Vec<Pattern>>>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tokens.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Rules")
            .field("token_holders", &names)
            .field("grants", &self.grants)
            .finish()
    }
}

/// Why the auth files could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: {reason}")]
pub struct RulesError {
    path: String,
    line: usize,
    reason: String,
}

fn lines(path: &Path) -> Result<Vec<(usize, Vec<String>)>, RulesError> {
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| RulesError {
        path: path.display().to_string(),
        line: 0,
        reason: e.to_string(),
    })?);
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split('#').next().unwrap_or("")))
        .map(|(i, l)| {
            (
                i,
                l.split_whitespace().map(str::to_owned).collect::<Vec<_>>(),
            )
        })
        .filter(|(_, words)| !words.is_empty())
        .collect())
}

impl Rules {
    /// Reads the tokens file (`name token` lines) and the authz file (`name method...`
    /// lines), each if given.
    ///
    /// # Errors
    /// [`RulesError`] naming the file and line (never a token).
    pub fn load(tokens: Option<&Path>, authz: Option<&Path>) -> Result<Self, RulesError> {
        let mut rules = Self::default();
        if let Some(path) = tokens {
            for (line, words) in lines(path)? {
                let [name, token] = &words[..] else {
                    return Err(RulesError {
                        path: path.display().to_string(),
                        line,
                        reason: "expected `name token`".into(),
                    });
                };
                rules.tokens.push((
                    name.clone(),
                    zeroize::Zeroizing::new(token.as_bytes().to_vec()),
                ));
            }
        }
        if let Some(path) = authz {
            let mut grants: HashMap<String, Vec<Pattern>> = HashMap::new();
            for (line, words) in lines(path)? {
                let Some((name, methods)) = words.split_first().filter(|(_, m)| !m.is_empty())
                else {
                    return Err(RulesError {
                        path: path.display().to_string(),
                        line,
                        reason: "expected `name method...`".into(),
                    });
                };
                grants
                    .entry(name.clone())
                    .or_default()
                    .extend(methods.iter().map(|m| Pattern::parse(m)));
            }
            rules.grants = Some(grants);
        }
        Ok(rules)
    }

    /// The caller a bearer token names, comparing against every known token in constant
    /// time.
    fn by_token(&self, presented: &[u8]) -> Option<&str> {
        let mut found = None;
        for (name, token) in &self.tokens {
            if bool::from(token.as_slice().ct_eq(presented)) {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// The caller among a certificate's DNS names: one the authz file knows, or (without
    /// one) the first.
    fn by_certificate<'a>(&self, names: &[&'a str]) -> Option<&'a str> {
        match &self.grants {
            Some(grants) => names.iter().copied().find(|n| grants.contains_key(*n)),
            None => names.first().copied(),
        }
    }

    fn allows(&self, caller: &str, method: &str) -> bool {
        match &self.grants {
            None => true,
            Some(grants) => grants
                .get(caller)
                .is_some_and(|ps| ps.iter().any(|p| p.matches(method))),
        }
    }
}

/// The policy every connection shares; its rules are swapped whole on a reload.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    rules: Option<Arc<ArcSwap<Rules>>>,
}

impl AuthLayer {
    /// Checks callers by `rules`; `None` lets every call through (no auth flags).
    pub fn new(rules: Option<Arc<ArcSwap<Rules>>>) -> Self {
        Self { rules }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            rules: self.rules.clone(),
            inner,
        }
    }
}

/// A service behind [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    rules: Option<Arc<ArcSwap<Rules>>>,
    inner: S,
}

/// The DNS names of the client's certificate, under mutual TLS.
fn certificate_names<B>(req: &http::Request<B>) -> Vec<String> {
    let Some(info) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() else {
        return Vec::new();
    };
    let Some(certs) = info.peer_certs() else {
        return Vec::new();
    };
    let Some(leaf) = certs.first() else {
        return Vec::new();
    };
    match webpki::EndEntityCert::try_from(leaf) {
        Ok(cert) => cert.valid_dns_names().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    }
}

/// Who makes `req` and whether they may: `Ok` to go on, or the refusal.
fn decide<B>(rules: &Rules, req: &http::Request<B>, method: &str) -> Result<(), Status> {
    let refuse = |caller: &str, reason: &'static str| {
        metrics::counter!(names::AUTH_REFUSALS, "caller" => caller.to_owned(), "reason" => reason)
            .increment(1);
    };
    let bearer = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let caller = match bearer {
        Some(token) => match rules.by_token(token.trim().as_bytes()) {
            Some(name) => name.to_owned(),
            None => {
                refuse("unknown", "unauthenticated");
                return Err(Status::unauthenticated(
                    "the bearer token is not one this server knows",
                ));
            }
        },
        None => {
            let names = certificate_names(req);
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            match rules.by_certificate(&names) {
                Some(name) => name.to_owned(),
                None => {
                    refuse("unknown", "unauthenticated");
                    return Err(Status::unauthenticated(
                        "no known caller: send `authorization: Bearer <token>` or a client certificate this server knows",
                    ));
                }
            }
        }
    };
    if rules.allows(&caller, method) {
        return Ok(());
    }
    refuse(&caller, "permission_denied");
    Err(Status::permission_denied(format!(
        "caller {caller} may not call {method}"
    )))
}

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().trim_start_matches('/');
        let open = method.starts_with("grpc.health.v1.Health/");
        if let (Some(rules), false) = (&self.rules, open)
            && let Err(status) = decide(&rules.load(), &req, method)
        {
            return Box::pin(async move { Ok(status.into_http()) });
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_written() {
        let all = Pattern::parse("*");
        let nearby = Pattern::parse("geomatch.v1.Nearby/*");
        let one = Pattern::parse("geomatch.v1.Nearby/SearchNearby");
        let reflection = Pattern::parse("grpc.reflection.*");
        assert!(all.matches("geomatch.v1.Shake/Shake"));
        assert!(nearby.matches("geomatch.v1.Nearby/UpdateLocation"));
        assert!(!nearby.matches("geomatch.v1.Shake/Shake"));
        assert!(one.matches("geomatch.v1.Nearby/SearchNearby"));
        assert!(!one.matches("geomatch.v1.Nearby/SearchNearbyX"));
        assert!(reflection.matches("grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        assert!(
            reflection.matches("grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        );
    }

    #[test]
    fn tokens_name_callers_and_grants_decide() {
        let rules = Rules {
            tokens: vec![
                (
                    "backend".into(),
                    zeroize::Zeroizing::new(b"s3cret-a".to_vec()),
                ),
                (
                    "operator".into(),
                    zeroize::Zeroizing::new(b"s3cret-b".to_vec()),
                ),
            ],
            grants: Some(HashMap::from([
                ("backend".into(), vec![Pattern::All]),
                (
                    "operator".into(),
                    vec![Pattern::parse("geomatch.v1.Nearby/SearchNearby")],
                ),
            ])),
        };
        assert_eq!(rules.by_token(b"s3cret-a"), Some("backend"));
        assert_eq!(rules.by_token(b"s3cret-b"), Some("operator"));
        assert_eq!(rules.by_token(b"s3cret-"), None);
        assert_eq!(rules.by_token(b""), None);
        assert!(rules.allows("backend", "geomatch.v1.Shake/Shake"));
        assert!(rules.allows("operator", "geomatch.v1.Nearby/SearchNearby"));
        assert!(!rules.allows("operator", "geomatch.v1.Nearby/UpdateLocation"));
        assert!(!rules.allows("stranger", "geomatch.v1.Nearby/SearchNearby"));
        assert_eq!(rules.by_certificate(&["x", "operator"]), Some("operator"));
        assert_eq!(rules.by_certificate(&["x"]), None);
        // Debug output names token holders, never tokens.
        let shown = format!("{rules:?}");
        assert!(
            shown.contains("backend") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
