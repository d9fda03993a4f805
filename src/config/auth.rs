//! Caller authentication and authorization flags: bearer tokens and which caller may call
//! which RPCs.

use std::path::PathBuf;

use clap::Args;

/// The files callers are known and allowed by (read again when they change, or on SIGHUP).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthFiles {
    /// `name token` per line: a caller presenting `authorization: Bearer <token>` is `name`.
    pub tokens: Option<PathBuf>,
    /// `name method...` per line: what each caller may call.
    pub authz: Option<PathBuf>,
}

impl AuthFiles {
    /// Whether callers are checked at all (without either file: the loopback / development
    /// mode, everyone may call everything).
    pub fn enabled(&self) -> bool {
        self.tokens.is_some() || self.authz.is_some()
    }
}

/// Who may call. Without either flag, every caller may call every RPC.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// Bearer tokens: one `name token` per line (`#` starts a comment). A call carrying
    /// `authorization: Bearer <token>` is made by `name`. Read again when the file
    /// changes or on SIGHUP.
    #[arg(long, env = "GEOMATCH_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,

    /// Authorization: one `name method...` per line, each method `service/Method`,
    /// `service/*`, a prefix ending in `*`, or `*` for everything. Callers are named by
    /// their bearer token, else by a DNS name of their mutual-TLS certificate. Unknown
    /// callers get UNAUTHENTICATED, known ones PERMISSION_DENIED for what they may not
    /// call. Health is open to everyone.
    #[arg(long, env = "GEOMATCH_AUTHZ_FILE")]
    pub authz_file: Option<PathBuf>,
}

impl AuthArgs {
    /// The files.
    pub fn settings(&self) -> AuthFiles {
        AuthFiles {
            tokens: self.auth_tokens_file.clone(),
            authz: self.authz_file.clone(),
        }
    }
}
