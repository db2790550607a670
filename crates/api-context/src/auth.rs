//! Authentication and authorization at the API, in one place.
//!
//! [`AuthLayer`] wraps every client-port service. For each call it looks the method up in
//! [`metastore_auth::needs::RPC_RULES`], resolves the caller's credentials (the `token` metadata
//! etcd clients send, or the client certificate's CN under `--client-cert-auth`), refuses what
//! the rule forbids, and hands the resolved [`Caller`] to the handler in the request's extensions.
//! Handlers whose rule depends on the request's keys call [`ServerContext::authorize`] with the
//! needs computed by `metastore_auth::needs` — the same lists the apply step checks again.
//!
//! [`AuthGate`] holds what authentication needs at the API (the replicated store, the token
//! scheme, the per-user Authenticate rate limit); the Auth gRPC service itself lives in
//! `metastore-etcd-api`.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use metastore_auth::needs::{rule_for, Rule};
use metastore_auth::tokens::TokenProvider;
use metastore_auth::{AuthError, AuthInfo, AuthStore, Need};
use parking_lot::Mutex;
use tonic::{Request as GrpcRequest, Status};

use crate::ServerContext;

/// The status etcd answers for an auth refusal.
pub fn auth_status(e: &AuthError) -> Status {
    Status::new(tonic::Code::from_i32(e.grpc_code()), e.to_string())
}

/// Who is calling, as the credentials of the request say. Anonymous when the request carried
/// none (or auth was disabled when it arrived).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The user name; empty for an anonymous caller.
    pub username: String,
    /// The auth revision a JWT token was signed at; `None` for simple tokens and certificate
    /// users, which are valid for the store's current revision.
    pub token_revision: Option<u64>,
    /// The token the call carried, so that each request on a stream can resolve it again.
    token: Token,
}

/// A token as the client sent it. Never printed.
#[derive(Clone, Default)]
struct Token(Option<Arc<str>>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Token(..)"
        } else {
            "None"
        })
    }
}

impl Token {
    fn of(token: Option<&str>) -> Token {
        Token(token.map(Arc::from))
    }
}

impl Caller {
    /// The caller of `request`: what [`AuthLayer`] resolved, or anonymous.
    pub fn of<T>(request: &GrpcRequest<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_default()
    }
}

/// What authentication needs at the API: the replicated store, the token scheme and the
/// per-user Authenticate rate limit.
pub struct AuthGate {
    /// The replicated auth store (read side).
    pub store: AuthStore,
    /// `--auth-token`.
    pub tokens: TokenProvider,
    /// `--bcrypt-cost`.
    pub bcrypt_cost: u32,
    /// `--client-cert-auth`: a verified client certificate's CN names the user.
    pub client_cert_auth: bool,
    attempts: Mutex<Attempts>,
    /// Calls held until their simple token's index is applied here.
    token_waiters: AtomicUsize,
}

/// Authenticate attempts one user may burst, and how many per second are refilled.
const AUTH_BURST: f64 = 10.0;
const AUTH_REFILL_PER_SEC: f64 = 5.0;

impl AuthGate {
    /// A gate over `store`.
    pub fn new(
        store: AuthStore,
        tokens: TokenProvider,
        bcrypt_cost: u32,
        client_cert_auth: bool,
    ) -> Self {
        AuthGate {
            store,
            tokens,
            bcrypt_cost,
            client_cert_auth,
            attempts: Mutex::new(Attempts {
                hasher: RandomState::new(),
                buckets: HashMap::new(),
            }),
            token_waiters: AtomicUsize::new(0),
        }
    }

    /// Resolves the credentials of a call: the `token` metadata, else the certificate's CN.
    fn resolve(
        &self,
        token: Option<&str>,
        cert_user: impl FnOnce() -> Option<String>,
    ) -> Result<Caller, AuthError> {
        if !self.store.is_enabled() {
            return Ok(Caller::default());
        }
        if let Some(token) = token {
            return match &self.tokens {
                TokenProvider::Simple => self
                    .store
                    .simple_tokens()
                    .lookup(token)
                    .map(|username| Caller {
                        username,
                        token_revision: None,
                        token: Token::of(Some(token)),
                    })
                    .ok_or(AuthError::InvalidAuthToken),
                TokenProvider::Jwt(jwt) => {
                    let (username, revision) = jwt.verify(token)?;
                    Ok(Caller {
                        username,
                        token_revision: Some(revision),
                        token: Token::of(Some(token)),
                    })
                }
            };
        }
        if self.client_cert_auth {
            if let Some(username) = cert_user() {
                return Ok(Caller {
                    username,
                    token_revision: None,
                    token: Token::default(),
                });
            }
        }
        Ok(Caller::default())
    }

    /// `caller` as its credentials say now: the token it opened a stream with is resolved again
    /// (a password change, the user's deletion or auth disabled and enabled again invalidate
    /// simple tokens; a JWT expires); a certificate user or an anonymous caller stays as it was.
    fn resolve_again(&self, caller: &Caller) -> Result<Caller, AuthError> {
        match caller.token.0.as_deref() {
            Some(token) => self.resolve(Some(token), || None),
            None => Ok(caller.clone()),
        }
    }

    /// The identity to check `caller` with, at the auth revision current now.
    pub fn info(&self, caller: &Caller) -> AuthInfo {
        AuthInfo {
            username: caller.username.clone(),
            revision: caller
                .token_revision
                .unwrap_or_else(|| self.store.revision()),
        }
    }

    /// Admits an Authenticate attempt for `user` unless it exceeds the per-user rate.
    ///
    /// The user name is chosen by an unauthenticated client, so the table keeps a keyed hash of
    /// it (never the name) and at most [`AUTH_TRACKED_USERS`] entries: a flood of fresh names
    /// costs a bounded amount of memory, and what it evicts first are the buckets idle longest.
    pub fn admit_attempt(&self, user: &str) -> Result<(), AuthError> {
        self.admit_attempt_at(user, Instant::now())
    }

    /// [`AuthGate::admit_attempt`] at time `now` (tests fix the clock: refills depend on it).
    fn admit_attempt_at(&self, user: &str, now: Instant) -> Result<(), AuthError> {
        let mut attempts = self.attempts.lock();
        let key = attempts.hasher.hash_one(user);
        if !attempts.buckets.contains_key(&key) && attempts.buckets.len() >= AUTH_TRACKED_USERS {
            attempts.make_room(now);
        }
        let (tokens, at) = attempts.buckets.entry(key).or_insert((AUTH_BURST, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * AUTH_REFILL_PER_SEC).min(AUTH_BURST);
        *at = now;
        if *tokens < 1.0 {
            return Err(AuthError::TooManyRequests);
        }
        *tokens -= 1.0;
        Ok(())
    }

    /// How many calls wait now for their simple token's index to be applied here.
    pub fn token_waiters(&self) -> usize {
        self.token_waiters.load(Ordering::Acquire)
    }

    /// How many user names the Authenticate rate limit tracks now.
    pub fn tracked_attempts(&self) -> usize {
        self.attempts.lock().buckets.len()
    }
}

/// Most user names the Authenticate rate limit tracks at once.
pub const AUTH_TRACKED_USERS: usize = 10_000;

/// The Authenticate rate limit's buckets, by keyed hash of the user name: (tokens left, last
/// attempt).
struct Attempts {
    hasher: RandomState,
    buckets: HashMap<u64, (f64, Instant)>,
}

impl Attempts {
    /// Frees at least a tenth of the table: buckets that refilled completely are the same as
    /// absent ones; if too few did, the fullest go (names tried least lately), so that a flood
    /// of fresh names cannot evict a user who is being limited.
    fn make_room(&mut self, now: Instant) {
        let level = |&(tokens, at): &(f64, Instant)| {
            (tokens + now.duration_since(at).as_secs_f64() * AUTH_REFILL_PER_SEC).min(AUTH_BURST)
        };
        self.buckets.retain(|_, bucket| level(bucket) < AUTH_BURST);
        let keep = AUTH_TRACKED_USERS - AUTH_TRACKED_USERS / 10;
        if self.buckets.len() > keep {
            let mut levels: Vec<f64> = self.buckets.values().map(level).collect();
            let (_, &mut fullest_kept_bound, _) =
                levels.select_nth_unstable_by(keep, |a, b| a.total_cmp(b));
            self.buckets
                .retain(|_, bucket| level(bucket) < fullest_kept_bound);
        }
    }
}

/// At most the first 64 bytes of a client-chosen name, for logs.
pub fn name_for_log(name: &str) -> &str {
    if name.len() <= 64 {
        return name;
    }
    let mut end = 64;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// The CN of the first verified client certificate of a TLS connection.
fn certificate_cn<B>(request: &http::Request<B>) -> Option<String> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let certs = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    let der = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}

/// The tower layer that admits calls on the client port (see the module's description).
#[derive(Clone)]
pub struct AuthLayer {
    ctx: ServerContext,
}

impl AuthLayer {
    /// A layer checking calls against `ctx`'s auth gate.
    pub fn new(ctx: ServerContext) -> Self {
        AuthLayer { ctx }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthMiddleware<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthMiddleware {
            inner,
            ctx: self.ctx.clone(),
        }
    }
}

/// The service [`AuthLayer`] builds.
#[derive(Clone)]
pub struct AuthMiddleware<S> {
    inner: S,
    ctx: ServerContext,
}

/// Why a call was not admitted at once.
enum NotAdmitted {
    /// Refused with this status.
    Refused(Status),
    /// Its simple token was issued at this log index, which this member has not applied yet
    /// (the client authenticated through a faster member): wait, then decide.
    NotYetApplied(u64),
}

impl AuthMiddleware<()> {
    /// Decides on one call: `Ok(Some(caller))` to let it through with that caller.
    fn admit<B>(
        ctx: &ServerContext,
        request: &http::Request<B>,
    ) -> Result<Option<Caller>, NotAdmitted> {
        let gate = &ctx.auth;
        // etcd clients send `token`; etcd 3.5+ also takes `authorization`, with or without
        // `Bearer `.
        let token = request
            .headers()
            .get("token")
            .or_else(|| request.headers().get("authorization"))
            .and_then(|v| v.to_str().ok())
            .map(|t| t.strip_prefix("Bearer ").unwrap_or(t));
        if !gate.store.is_enabled() {
            // Requests on a stream opened now are checked should auth be enabled later.
            return Ok(token.map(|token| Caller {
                token: Token::of(Some(token)),
                ..Caller::default()
            }));
        }
        let rule = rule_for(request.uri().path());
        if rule == Rule::Open {
            return Ok(None);
        }
        let caller = match gate.resolve(token, || certificate_cn(request)) {
            Ok(caller) => caller,
            Err(AuthError::InvalidAuthToken) => {
                let applied = ctx.raft.with_status(|s| s.applied_index);
                return Err(match (&gate.tokens, token) {
                    (TokenProvider::Simple, Some(token)) => match simple_token_wait(token, applied)
                    {
                        Some(index) => NotAdmitted::NotYetApplied(index),
                        None => NotAdmitted::Refused(auth_status(&AuthError::InvalidAuthToken)),
                    },
                    _ => NotAdmitted::Refused(auth_status(&AuthError::InvalidAuthToken)),
                });
            }
            Err(e) => return Err(NotAdmitted::Refused(auth_status(&e))),
        };
        let need = match rule {
            Rule::Admin => Some(Need::Admin),
            Rule::Authenticated | Rule::Keys | Rule::SelfOrAdmin => Some(Need::Authenticated),
            Rule::Open => None,
        };
        if let Some(need) = need {
            gate.store
                .check(&gate.info(&caller), &[need])
                .map_err(|e| NotAdmitted::Refused(auth_status(&e)))?;
        }
        Ok(Some(caller))
    }
}

/// How far ahead of this member's applied index a simple token's index may be and still be
/// waited for: further than this, the member could not apply that many entries within the
/// wait anyway.
const MAX_TOKEN_INDEX_LEAD: u64 = 1_000_000;

/// The log index to wait for before deciding on a simple token this member does not know, or
/// `None` to refuse it at once. etcd's simple tokens are `<prefix>.<index>`: like etcd, wait for
/// a token issued at an index not yet applied here.
fn simple_token_wait(token: &str, applied_index: u64) -> Option<u64> {
    let (prefix, index) = token.split_once('.')?;
    let well_formed = prefix.len() == SIMPLE_TOKEN_PREFIX_LEN
        && prefix.bytes().all(|b| b.is_ascii_alphabetic())
        && !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit());
    if !well_formed {
        return None;
    }
    let index = index.parse::<u64>().ok()?;
    (index > applied_index && index - applied_index <= MAX_TOKEN_INDEX_LEAD).then_some(index)
}

/// The length of a simple token's prefix: 16 ASCII letters
/// ([`metastore_auth::tokens::simple_token_prefix`]).
const SIMPLE_TOKEN_PREFIX_LEN: usize = 16;

/// Most calls held at once for a simple token not applied yet; more are refused at once, so
/// that a flood of forged tokens costs little.
const MAX_TOKEN_WAITERS: usize = 1024;

/// One call held until its simple token's index is applied: counted in
/// [`AuthGate::token_waiters`] while it lives.
struct TokenWaiter<'a>(&'a AtomicUsize);

impl<'a> TokenWaiter<'a> {
    fn enter(waiters: &'a AtomicUsize) -> Option<TokenWaiter<'a>> {
        waiters
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_TOKEN_WAITERS).then_some(n + 1)
            })
            .ok()
            .map(|_| TokenWaiter(waiters))
    }
}

impl Drop for TokenWaiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits (woken by the raft loop, no polling) until this member applied `index`, at most
/// [`crate::PROPOSAL_TIMEOUT`]; whether it did. False at once when too many calls wait already.
async fn wait_applied(ctx: &ServerContext, index: u64) -> bool {
    let Some(_waiter) = TokenWaiter::enter(&ctx.auth.token_waiters) else {
        return false;
    };
    ctx.raft.wait_applied(index, crate::PROPOSAL_TIMEOUT).await
}

impl<S, B> tower_service::Service<http::Request<B>> for AuthMiddleware<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match AuthMiddleware::admit(&self.ctx, &request) {
            Ok(Some(caller)) => {
                request.extensions_mut().insert(caller);
            }
            Ok(None) => {}
            Err(NotAdmitted::Refused(status)) => {
                return Box::pin(async move { Ok(status.into_http()) })
            }
            Err(NotAdmitted::NotYetApplied(index)) => {
                // The service that was polled ready goes with the request.
                let ready = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, ready);
                let ctx = self.ctx.clone();
                return Box::pin(async move {
                    if !wait_applied(&ctx, index).await {
                        return Ok(auth_status(&AuthError::InvalidAuthToken).into_http());
                    }
                    match AuthMiddleware::admit(&ctx, &request) {
                        Ok(Some(caller)) => {
                            request.extensions_mut().insert(caller);
                        }
                        Ok(None) => {}
                        Err(NotAdmitted::Refused(status)) => return Ok(status.into_http()),
                        Err(NotAdmitted::NotYetApplied(_)) => {
                            return Ok(auth_status(&AuthError::InvalidAuthToken).into_http())
                        }
                    }
                    inner.call(request).await
                });
            }
        }
        Box::pin(self.inner.call(request))
    }
}

impl ServerContext {
    /// Checks a request on a stream opened earlier (a watch create, a keep-alive) as etcd does:
    /// the caller's credentials are resolved again, so a token invalidated since the stream
    /// opened no longer works; then as [`ServerContext::authorize`].
    pub fn authorize_on_stream(
        &self,
        caller: &Caller,
        needs: &[Need<'_>],
    ) -> Result<AuthInfo, Status> {
        if !self.auth.store.is_enabled() {
            return Ok(AuthInfo::default());
        }
        let current = self
            .auth
            .resolve_again(caller)
            .map_err(|e| auth_status(&e))?;
        self.authorize(&current, needs)
    }

    /// Checks `caller` against `needs` with the auth store as of now (after any read barrier),
    /// with etcd's errors; the identity to propose with.
    pub fn authorize(&self, caller: &Caller, needs: &[Need<'_>]) -> Result<AuthInfo, Status> {
        if !self.auth.store.is_enabled() {
            // Nothing is checked; the apply step re-checks should auth be enabled meanwhile.
            return Ok(AuthInfo::default());
        }
        let info = self.auth.info(caller);
        self.auth
            .store
            .check(&info, needs)
            .map_err(|e| auth_status(&e))?;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn gate() -> AuthGate {
        AuthGate::new(AuthStore::new(), TokenProvider::Simple, 4, false)
    }

    /// A flood of distinct large names failing Authenticate leaves a bounded table, and a user
    /// being limited stays limited through it. The flood happens at one instant: on a slow
    /// machine it took long enough (0.46 s in a CI run) for the limited user's bucket to refill
    /// a token, which is the rate limit working, not the table failing.
    #[test]
    fn authenticate_rate_limit_table_is_bounded() {
        let gate = gate();
        let now = Instant::now();
        while gate.admit_attempt_at("alice", now).is_ok() {}
        let padding = "x".repeat(1024);
        for i in 0..3 * AUTH_TRACKED_USERS {
            gate.admit_attempt_at(&format!("{i}{padding}"), now)
                .unwrap();
            assert!(gate.tracked_attempts() <= AUTH_TRACKED_USERS);
        }
        assert_eq!(
            gate.admit_attempt_at("alice", now).unwrap_err(),
            AuthError::TooManyRequests
        );
        // Its bucket refills with time: a fifth of a second gives it a token back.
        let later = now + Duration::from_millis(250);
        assert_eq!(gate.admit_attempt_at("alice", later), Ok(()));
    }

    /// Only a well-formed simple token issued at an index not applied yet (and not absurdly far
    /// ahead) is worth waiting for; anything else is refused at once.
    #[test]
    fn only_plausible_simple_tokens_wait() {
        let prefix = "abcdefghijklmnop";
        assert_eq!(simple_token_wait(&format!("{prefix}.11"), 10), Some(11));
        assert_eq!(simple_token_wait(&format!("{prefix}.10"), 10), None);
        assert_eq!(simple_token_wait(&format!("{prefix}.9"), 10), None);
        assert_eq!(simple_token_wait("garbage", 10), None);
        assert_eq!(simple_token_wait(&format!("{prefix}.+11"), 10), None);
        assert_eq!(simple_token_wait("x.11", 10), None);
        assert_eq!(simple_token_wait(&format!("{prefix}x.11"), 10), None);
        assert_eq!(simple_token_wait(&format!("a.b.{prefix}.11"), 10), None);
        assert_eq!(
            simple_token_wait(&format!("{prefix}.{}", u64::MAX), 10),
            None
        );
        assert_eq!(
            simple_token_wait(&format!("{prefix}.{}", 10 + MAX_TOKEN_INDEX_LEAD + 1), 10),
            None
        );
    }

    /// At most MAX_TOKEN_WAITERS calls are held at once; each one held is counted until it
    /// ends, however it ends.
    #[test]
    fn held_calls_are_capped_and_counted_until_they_end() {
        let gate = gate();
        let held: Vec<TokenWaiter<'_>> = (0..MAX_TOKEN_WAITERS)
            .map(|_| TokenWaiter::enter(&gate.token_waiters).expect("room for a waiter"))
            .collect();
        assert_eq!(gate.token_waiters(), MAX_TOKEN_WAITERS);
        assert!(TokenWaiter::enter(&gate.token_waiters).is_none());
        drop(held);
        assert_eq!(gate.token_waiters(), 0);
        assert!(TokenWaiter::enter(&gate.token_waiters).is_some());
        assert_eq!(gate.token_waiters(), 0);
    }

    #[test]
    fn long_names_are_cut_for_logs() {
        assert_eq!(name_for_log("alice"), "alice");
        assert_eq!(name_for_log(&"a".repeat(1 << 20)).len(), 64);
        // Never in the middle of a character.
        assert_eq!(name_for_log(&"é".repeat(100)).len(), 64);
        assert_eq!(name_for_log(&format!("a{}", "é".repeat(100))).len(), 63);
    }
}
