//! Auth tokens, as etcd's `--auth-token` chooses them.
//!
//! - `simple`: an opaque `<16 letters>.<log index>` issued by every member when it applies the
//!   Authenticate entry, kept in memory only (a restart invalidates it), valid for
//!   `--auth-token-ttl` seconds after its last use; a password change or user deletion revokes
//!   the user's tokens.
//! - `jwt,pub-key=F,priv-key=F,sign-method=M[,ttl=D]`: a signed token carrying the user name and
//!   the auth revision, verifiable by any member configured with the same key. A token signed
//!   before the last auth change gets `revision of auth store is old` on its next write, after
//!   which clients authenticate again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::AuthError;

/// etcd's default `--auth-token-ttl`: 300 s.
pub const DEFAULT_SIMPLE_TTL: Duration = Duration::from_secs(300);

/// The simple tokens a member knows: token → (user, deadline).
pub struct SimpleTokens {
    ttl: Mutex<Duration>,
    /// Authenticate entries up to this log index belong to an earlier run: no token for them.
    skip_until: std::sync::atomic::AtomicU64,
    live: Mutex<HashMap<String, (String, Instant)>>,
}

impl Default for SimpleTokens {
    fn default() -> Self {
        SimpleTokens {
            ttl: Mutex::new(DEFAULT_SIMPLE_TTL),
            skip_until: std::sync::atomic::AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
        }
    }
}

impl SimpleTokens {
    /// Sets the idle lifetime of tokens (`--auth-token-ttl`).
    pub fn set_ttl(&self, ttl: Duration) {
        *self.ttl.lock() = ttl;
    }

    /// Issue no token for Authenticate entries up to `index` (an earlier run's).
    pub fn skip_until(&self, index: u64) {
        self.skip_until
            .store(index, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether an Authenticate entry at `index` was applied by an earlier run.
    pub(crate) fn is_replayed(&self, index: u64) -> bool {
        index <= self.skip_until.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records `token` for `user`; returns it.
    pub(crate) fn assign(&self, token: String, user: &str) -> String {
        let deadline = Instant::now() + *self.ttl.lock();
        let mut live = self.live.lock();
        if live.len() >= 1024 {
            let now = Instant::now();
            live.retain(|_, (_, d)| *d > now);
        }
        live.insert(token.clone(), (user.to_string(), deadline));
        token
    }

    /// The user of a live token; each use extends its life by the TTL.
    pub fn lookup(&self, token: &str) -> Option<String> {
        let ttl = *self.ttl.lock();
        let mut live = self.live.lock();
        let now = Instant::now();
        match live.get_mut(token) {
            Some((user, deadline)) if *deadline > now => {
                *deadline = now + ttl;
                Some(user.clone())
            }
            Some(_) => {
                live.remove(token);
                None
            }
            None => None,
        }
    }

    /// Revokes every token of `user`.
    pub(crate) fn invalidate_user(&self, user: &str) {
        self.live.lock().retain(|_, (u, _)| u != user);
    }

    /// Revokes every token.
    pub(crate) fn invalidate_all(&self) {
        self.live.lock().clear();
    }
}

/// A fresh simple-token prefix: 16 random ASCII letters, as etcd makes them.
pub fn simple_token_prefix() -> String {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut rng = rand::rng();
    (0..16)
        .map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char)
        .collect()
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

/// Signs and verifies JWT tokens.
pub struct JwtTokens {
    encoding: jsonwebtoken::EncodingKey,
    decoding: jsonwebtoken::DecodingKey,
    algorithm: jsonwebtoken::Algorithm,
    ttl: Duration,
}

impl std::fmt::Debug for JwtTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtTokens")
            .field("algorithm", &self.algorithm)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl JwtTokens {
    /// A token for `username`, valid for the TTL, stamped with `revision`.
    pub fn sign(&self, username: &str, revision: u64) -> Result<String, AuthError> {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            + self.ttl;
        let claims = Claims {
            username: username.to_string(),
            revision,
            exp: exp.as_secs(),
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(self.algorithm),
            &claims,
            &self.encoding,
        )
        .map_err(|e| AuthError::Storage(format!("signing a token: {e}")))
    }

    /// The user and auth revision of a valid, unexpired token.
    pub fn verify(&self, token: &str) -> Result<(String, u64), AuthError> {
        let mut validation = jsonwebtoken::Validation::new(self.algorithm);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|_| AuthError::InvalidAuthToken)?;
        Ok((data.claims.username, data.claims.revision))
    }
}

/// The token scheme of `--auth-token`.
#[derive(Debug)]
pub enum TokenProvider {
    /// Opaque tokens issued through the log (the default).
    Simple,
    /// Signed tokens.
    Jwt(JwtTokens),
}

/// Parses a Go-style duration (`300ms`, `10s`, `5m`, `1h`, `1h30m`, `1.5s`), as etcd's duration
/// flags and the JWT `ttl` option take them. The server's duration flags use it too.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    if rest == "0" {
        // Go accepts a bare zero.
        return Ok(Duration::ZERO);
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| format!("duration {s:?} lacks a unit"))?;
        let value: f64 = rest[..digits]
            .parse()
            .map_err(|_| format!("bad duration {s:?}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        // Go's time.ParseDuration units, in nanoseconds (exact for whole numbers).
        let unit_ns = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            other => return Err(format!("unknown unit {other:?} in duration {s:?}")),
        };
        let ns = (value * unit_ns).round();
        total = (ns.is_finite() && ns < u64::MAX as f64)
            .then(|| Duration::from_nanos(ns as u64))
            .and_then(|d| total.checked_add(d))
            .ok_or_else(|| format!("duration {s:?} is out of range"))?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

impl TokenProvider {
    /// Parses etcd's `--auth-token` value and reads the key files it names.
    pub fn from_flag(spec: &str) -> Result<TokenProvider, String> {
        let mut parts = spec.split(',');
        match parts.next().unwrap_or_default() {
            "simple" | "" => Ok(TokenProvider::Simple),
            "jwt" => {
                let (mut public, mut private, mut method, mut ttl) =
                    (None, None, None, Duration::from_secs(300));
                for option in parts {
                    let (k, v) = option
                        .split_once('=')
                        .ok_or_else(|| format!("--auth-token: bad option {option:?}"))?;
                    match k {
                        "pub-key" => public = Some(v.to_string()),
                        "priv-key" => private = Some(v.to_string()),
                        "sign-method" => method = Some(v.to_string()),
                        "ttl" => ttl = parse_duration(v)?,
                        other => return Err(format!("--auth-token: unknown option {other:?}")),
                    }
                }
                let method = method.ok_or("--auth-token jwt needs sign-method=")?;
                let algorithm: jsonwebtoken::Algorithm = method
                    .parse()
                    .map_err(|_| format!("--auth-token: unsupported sign-method {method:?}"))?;
                let read = |path: &Option<String>, what: &str| {
                    let path = path
                        .as_ref()
                        .ok_or_else(|| format!("--auth-token jwt needs {what}="))?;
                    std::fs::read(path).map_err(|e| format!("reading {path}: {e}"))
                };
                use jsonwebtoken::{Algorithm::*, DecodingKey, EncodingKey};
                let (encoding, decoding) = match algorithm {
                    HS256 | HS384 | HS512 => {
                        let secret = read(&private, "priv-key")?;
                        (
                            EncodingKey::from_secret(&secret),
                            DecodingKey::from_secret(&secret),
                        )
                    }
                    RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => (
                        EncodingKey::from_rsa_pem(&read(&private, "priv-key")?)
                            .map_err(|e| format!("priv-key: {e}"))?,
                        DecodingKey::from_rsa_pem(&read(&public, "pub-key")?)
                            .map_err(|e| format!("pub-key: {e}"))?,
                    ),
                    ES256 | ES384 => (
                        EncodingKey::from_ec_pem(&read(&private, "priv-key")?)
                            .map_err(|e| format!("priv-key: {e}"))?,
                        DecodingKey::from_ec_pem(&read(&public, "pub-key")?)
                            .map_err(|e| format!("pub-key: {e}"))?,
                    ),
                    EdDSA => (
                        EncodingKey::from_ed_pem(&read(&private, "priv-key")?)
                            .map_err(|e| format!("priv-key: {e}"))?,
                        DecodingKey::from_ed_pem(&read(&public, "pub-key")?)
                            .map_err(|e| format!("pub-key: {e}"))?,
                    ),
                };
                Ok(TokenProvider::Jwt(JwtTokens {
                    encoding,
                    decoding,
                    algorithm,
                    ttl,
                }))
            }
            other => Err(format!(
                "--auth-token: unknown token type {other:?} (simple or jwt)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(
            parse_duration("5000000000ns").unwrap(),
            Duration::from_secs(5)
        );
        assert_eq!(parse_duration("20us").unwrap(), Duration::from_micros(20));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("99999999999999999999999h").is_err());
    }

    #[test]
    fn simple_tokens_expire_and_are_revoked() {
        let tokens = SimpleTokens::default();
        tokens.set_ttl(Duration::from_millis(50));
        let t = tokens.assign("abc.1".into(), "alice");
        assert_eq!(tokens.lookup(&t).as_deref(), Some("alice"));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(tokens.lookup(&t), None);
        let t = tokens.assign("abc.2".into(), "alice");
        tokens.invalidate_user("alice");
        assert_eq!(tokens.lookup(&t), None);
        assert_eq!(simple_token_prefix().len(), 16);
    }

    #[test]
    fn hs256_tokens_round_trip_and_reject_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("secret");
        std::fs::write(&key, b"0123456789abcdef").unwrap();
        let spec = format!("jwt,priv-key={},sign-method=HS256,ttl=1m", key.display());
        let TokenProvider::Jwt(jwt) = TokenProvider::from_flag(&spec).unwrap() else {
            panic!("not jwt");
        };
        let token = jwt.sign("alice", 7).unwrap();
        assert_eq!(jwt.verify(&token).unwrap(), ("alice".to_string(), 7));
        let mut bad = token.clone();
        bad.push('x');
        assert_eq!(jwt.verify(&bad), Err(AuthError::InvalidAuthToken));
    }
}
