//! etcd's auth store: users, roles, key permissions, the enabled flag and the auth revision.
//!
//! Owns: the replicated auth state, persisted in etcd's buckets (`auth`, `authUsers`,
//! `authRoles`; invisible through KV and outside HashKV), and changed only by the apply step
//! ([`AuthStore`]'s `apply_*` methods, deterministic); the permission check used both at the API
//! and again at apply time ([`AuthStore::check`], [`needs`]); password hashing (bcrypt, done by
//! the member that receives the request, so only hashes enter the log); tokens ([`tokens`]).
//!
//! Must not depend on: raft, gRPC services, the engine choice.

mod error;
pub mod needs;
mod perms;
pub mod tokens;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use error::AuthError;
pub use needs::Need;

use metastore_proto::authpb::{
    permission::Type as PermType, Permission, Role, User, UserAddOptions,
};
use metastore_proto::etcdserverpb::{
    AuthRoleGrantPermissionRequest, AuthRoleRevokePermissionRequest, AuthUserAddRequest,
};
use metastore_storage::{ReadView, ScanRange, Visit, WriteBatch};
use parking_lot::RwLock;
use perms::{covered, Interval};
use prost::Message;

/// etcd's bucket for the enabled flag and the auth revision.
pub const AUTH_BUCKET: &str = "auth";
/// etcd's bucket of users (key: name; value: `authpb.User`).
pub const AUTH_USERS_BUCKET: &str = "authUsers";
/// etcd's bucket of roles (key: name; value: `authpb.Role`).
pub const AUTH_ROLES_BUCKET: &str = "authRoles";
/// Every bucket this crate keeps.
pub const BUCKETS: [&str; 3] = [AUTH_BUCKET, AUTH_USERS_BUCKET, AUTH_ROLES_BUCKET];

const ENABLED_KEY: &[u8] = b"authEnabled";
const REVISION_KEY: &[u8] = b"authRevision";

/// The user and role that may do everything.
pub const ROOT: &str = "root";

/// Who makes a request, as the API established it: the user and the auth revision their
/// credentials were checked against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthInfo {
    /// The user name; empty when the request carried no credentials.
    pub username: String,
    /// The auth revision the credentials are valid for.
    pub revision: u64,
}

#[derive(Debug, Default)]
struct State {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
}

impl State {
    fn has_root_role(&self, user: &User) -> bool {
        user.roles.iter().any(|r| r == ROOT)
    }

    fn bump(&mut self, batch: &mut WriteBatch) {
        self.revision += 1;
        batch.put(
            AUTH_BUCKET,
            REVISION_KEY.to_vec(),
            self.revision.to_be_bytes().to_vec(),
        );
    }

    fn put_user(&mut self, user: User, batch: &mut WriteBatch) {
        let name = String::from_utf8_lossy(&user.name).into_owned();
        batch.put(
            AUTH_USERS_BUCKET,
            name.as_bytes().to_vec(),
            user.encode_to_vec(),
        );
        self.users.insert(name, user);
    }

    fn put_role(&mut self, role: Role, batch: &mut WriteBatch) {
        let name = String::from_utf8_lossy(&role.name).into_owned();
        batch.put(
            AUTH_ROLES_BUCKET,
            name.as_bytes().to_vec(),
            role.encode_to_vec(),
        );
        self.roles.insert(name, role);
    }

    fn user(&self, name: &str) -> Result<&User, AuthError> {
        self.users.get(name).ok_or(AuthError::UserNotFound)
    }

    /// The intervals a user may access with `kind`, from every role it has.
    fn granted(&self, user: &User, write: bool) -> Vec<Interval> {
        let mut out = Vec::new();
        for role in user.roles.iter().filter_map(|r| self.roles.get(r)) {
            for perm in &role.key_permission {
                let ok = match PermType::try_from(perm.perm_type).unwrap_or(PermType::Read) {
                    PermType::Readwrite => true,
                    PermType::Read => !write,
                    PermType::Write => write,
                };
                if ok {
                    out.push(Interval::of(&perm.key, &perm.range_end));
                }
            }
        }
        out
    }
}

/// Every record of `bucket`, by name.
fn load_bucket<T: Message + Default>(
    view: &dyn ReadView,
    bucket: &str,
) -> Result<BTreeMap<String, T>, AuthError> {
    let mut records = BTreeMap::new();
    let mut bad = None;
    view.scan(bucket, ScanRange::all(), &mut |k, v| match T::decode(v) {
        Ok(record) => {
            records.insert(String::from_utf8_lossy(k).into_owned(), record);
            Visit::Continue
        }
        Err(e) => {
            bad = Some(format!("{bucket} {:?}: {e}", String::from_utf8_lossy(k)));
            Visit::Stop
        }
    })?;
    match bad {
        Some(bad) => Err(AuthError::Storage(format!("corrupt auth record: {bad}"))),
        None => Ok(records),
    }
}

/// The replicated auth store. Cheap to clone; the apply step changes it, the API reads it.
#[derive(Clone, Default)]
pub struct AuthStore {
    state: Arc<RwLock<State>>,
    tokens: Arc<tokens::SimpleTokens>,
}

impl std::fmt::Debug for AuthStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.read();
        f.debug_struct("AuthStore")
            .field("enabled", &s.enabled)
            .field("revision", &s.revision)
            .field("users", &s.users.len())
            .field("roles", &s.roles.len())
            .finish()
    }
}

/// A salted bcrypt hash of `password` at `cost` (etcd's `--bcrypt-cost`, 4..=31).
pub fn hash_password(password: &str, cost: u32) -> Result<String, AuthError> {
    bcrypt::hash(password, cost).map_err(|e| AuthError::Storage(format!("bcrypt: {e}")))
}

impl AuthStore {
    /// An empty store (auth disabled, revision 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// The simple tokens issued by applied Authenticate requests (kept in memory only, as etcd
    /// does: a restart invalidates them).
    pub fn simple_tokens(&self) -> &tokens::SimpleTokens {
        &self.tokens
    }

    /// Replaces the state with the buckets' content.
    pub fn load(&self, view: &dyn ReadView) -> Result<(), AuthError> {
        let state = State {
            enabled: view
                .get(AUTH_BUCKET, ENABLED_KEY)?
                .is_some_and(|v| v == [1]),
            revision: match view.get(AUTH_BUCKET, REVISION_KEY)? {
                Some(v) => u64::from_be_bytes(
                    v.as_slice()
                        .try_into()
                        .map_err(|_| AuthError::Storage("corrupt auth revision".into()))?,
                ),
                None => 0,
            },
            users: load_bucket(view, AUTH_USERS_BUCKET)?,
            roles: load_bucket(view, AUTH_ROLES_BUCKET)?,
        };
        *self.state.write() = state;
        Ok(())
    }

    /// Whether auth is enabled.
    pub fn is_enabled(&self) -> bool {
        self.state.read().enabled
    }

    /// The auth revision: bumped by every change to users, roles or the enabled flag.
    pub fn revision(&self) -> u64 {
        self.state.read().revision
    }

    /// Whether `name` is a user.
    pub fn user_exists(&self, name: &str) -> bool {
        self.state.read().users.contains_key(name)
    }

    /// Checks `who` against `needs` (all must hold), as etcd does; nothing is checked while
    /// auth is disabled.
    ///
    /// Key needs follow etcd's `isOpPermitted`: no user → `user name is empty`; credentials
    /// older than the store → `revision of auth store is old` (even for root); unknown user →
    /// `permission denied`; `root` passes; otherwise the union of the user's permissions must
    /// cover every range. Without key needs it is etcd's `IsAdminPermitted`, which ignores the
    /// revision: no user → `user name is empty`, unknown user → `user name not found`, and
    /// [`Need::Admin`] needs the `root` role.
    pub fn check(&self, who: &AuthInfo, needs: &[Need<'_>]) -> Result<(), AuthError> {
        let state = self.state.read();
        if !state.enabled {
            return Ok(());
        }
        if who.username.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        let on_keys = needs
            .iter()
            .any(|n| matches!(n, Need::Read(..) | Need::Write(..)));
        if !on_keys {
            if !needs.contains(&Need::Admin) {
                return Ok(());
            }
            let user = state
                .users
                .get(&who.username)
                .ok_or(AuthError::UserNotFound)?;
            return if state.has_root_role(user) {
                Ok(())
            } else {
                Err(AuthError::PermissionDenied)
            };
        }
        if who.revision < state.revision {
            return Err(AuthError::OldRevision);
        }
        let user = state
            .users
            .get(&who.username)
            .ok_or(AuthError::PermissionDenied)?;
        if state.has_root_role(user) {
            return Ok(());
        }
        let (mut read, mut write) = (None, None);
        for need in needs {
            let ok = match need {
                Need::Authenticated => true,
                Need::Admin => false,
                Need::Read(k, e) => covered(
                    &Interval::of(k, e),
                    read.get_or_insert_with(|| state.granted(user, false)),
                ),
                Need::Write(k, e) => covered(
                    &Interval::of(k, e),
                    write.get_or_insert_with(|| state.granted(user, true)),
                ),
            };
            if !ok {
                return Err(AuthError::PermissionDenied);
            }
        }
        Ok(())
    }

    /// Whether `user` has role `role` (a user may read its own roles without being root).
    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.state
            .read()
            .users
            .get(user)
            .is_some_and(|u| u.roles.iter().any(|r| r == role))
    }

    /// Checks `password` against `name`'s stored hash (slow: bcrypt). etcd's answers: unknown
    /// user or wrong password → `authentication failed`; a `--no-password` user →
    /// `password was given for no password user`.
    pub fn check_password(&self, name: &str, password: &str) -> Result<(), AuthError> {
        let hash = {
            let state = self.state.read();
            let user = state.users.get(name).ok_or(AuthError::AuthFailed)?;
            if user.options.as_ref().is_some_and(|o| o.no_password) {
                return Err(AuthError::NoPasswordUser);
            }
            String::from_utf8_lossy(&user.password).into_owned()
        };
        match bcrypt::verify(password, &hash) {
            Ok(true) => Ok(()),
            _ => Err(AuthError::AuthFailed),
        }
    }

    /// A user's roles (sorted).
    pub fn user_get(&self, name: &str) -> Result<Vec<String>, AuthError> {
        Ok(self.state.read().user(name)?.roles.clone())
    }

    /// Every user name, sorted.
    pub fn user_list(&self) -> Vec<String> {
        self.state.read().users.keys().cloned().collect()
    }

    /// A role's permissions; the `root` role shows read-write on every key, as etcd 3.6 does.
    pub fn role_get(&self, name: &str) -> Result<Vec<Permission>, AuthError> {
        let state = self.state.read();
        match state.roles.get(name) {
            Some(_) if name == ROOT => Ok(vec![Permission {
                perm_type: PermType::Readwrite as i32,
                key: Vec::new(),
                range_end: vec![0],
            }]),
            Some(role) => Ok(role.key_permission.clone()),
            None => Err(AuthError::RoleNotFound),
        }
    }

    /// Every role name, sorted.
    pub fn role_list(&self) -> Vec<String> {
        self.state.read().roles.keys().cloned().collect()
    }

    // ---- apply: deterministic changes, written to `batch` and to memory ----

    /// AuthEnable: needs a `root` user holding the `root` role.
    pub fn apply_enable(&self, batch: &mut WriteBatch) -> Result<(), AuthError> {
        let mut state = self.state.write();
        if state.enabled {
            return Ok(());
        }
        let root = state.users.get(ROOT).ok_or(AuthError::RootUserNotExist)?;
        if !state.has_root_role(root) {
            return Err(AuthError::RootRoleNotExist);
        }
        state.enabled = true;
        // etcd does not bump the revision here (AuthDisable does).
        batch.put(AUTH_BUCKET, ENABLED_KEY.to_vec(), vec![1]);
        Ok(())
    }

    /// AuthDisable.
    pub fn apply_disable(&self, batch: &mut WriteBatch) -> Result<(), AuthError> {
        let mut state = self.state.write();
        if !state.enabled {
            return Ok(());
        }
        state.enabled = false;
        batch.put(AUTH_BUCKET, ENABLED_KEY.to_vec(), vec![0]);
        state.bump(batch);
        drop(state);
        self.tokens.invalidate_all();
        Ok(())
    }

    /// Authenticate, after the receiving member checked the password: issues the simple token
    /// `<prefix>.<index>` when a prefix is given. Fails if the user was deleted meanwhile.
    pub fn apply_authenticate(
        &self,
        name: &str,
        prefix: &str,
        index: u64,
    ) -> Result<(Option<String>, u64), AuthError> {
        let state = self.state.read();
        if !state.enabled {
            return Err(AuthError::NotEnabled);
        }
        if !state.users.contains_key(name) {
            return Err(AuthError::AuthFailed);
        }
        let issue = !prefix.is_empty() && !self.tokens.is_replayed(index);
        let token = issue.then(|| self.tokens.assign(format!("{prefix}.{index}"), name));
        Ok((token, state.revision))
    }

    /// UserAdd; `hashed_password` is what the receiving member computed.
    pub fn apply_user_add(
        &self,
        r: &AuthUserAddRequest,
        batch: &mut WriteBatch,
    ) -> Result<(), AuthError> {
        if r.name.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        let mut state = self.state.write();
        if state.users.contains_key(&r.name) {
            return Err(AuthError::UserAlreadyExist);
        }
        let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
        let user = User {
            name: r.name.as_bytes().to_vec(),
            password: if no_password {
                Vec::new()
            } else {
                r.hashed_password.as_bytes().to_vec()
            },
            roles: Vec::new(),
            options: Some(UserAddOptions { no_password }),
        };
        state.put_user(user, batch);
        state.bump(batch);
        Ok(())
    }

    /// UserDelete; `root` cannot be deleted while auth is enabled.
    pub fn apply_user_delete(&self, name: &str, batch: &mut WriteBatch) -> Result<(), AuthError> {
        let mut state = self.state.write();
        if state.enabled && name == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        state.user(name)?;
        state.users.remove(name);
        batch.delete(AUTH_USERS_BUCKET, name.as_bytes().to_vec());
        state.bump(batch);
        drop(state);
        self.tokens.invalidate_user(name);
        Ok(())
    }

    /// UserChangePassword; the user's tokens stop working.
    pub fn apply_user_change_password(
        &self,
        name: &str,
        hashed_password: &str,
        batch: &mut WriteBatch,
    ) -> Result<(), AuthError> {
        let mut state = self.state.write();
        let mut user = state.user(name)?.clone();
        // A `--no-password` user stays one (etcd keeps the option; it can only use a
        // certificate).
        user.password = hashed_password.as_bytes().to_vec();
        state.put_user(user, batch);
        state.bump(batch);
        drop(state);
        self.tokens.invalidate_user(name);
        Ok(())
    }

    /// UserGrantRole; granting a role twice is a no-op, as in etcd.
    pub fn apply_user_grant_role(
        &self,
        name: &str,
        role: &str,
        batch: &mut WriteBatch,
    ) -> Result<(), AuthError> {
        let mut state = self.state.write();
        let mut user = state.user(name)?.clone();
        if role != ROOT && !state.roles.contains_key(role) {
            return Err(AuthError::RoleNotFound);
        }
        match user.roles.binary_search_by(|r| r.as_str().cmp(role)) {
            Ok(_) => return Ok(()),
            Err(at) => user.roles.insert(at, role.to_string()),
        }
        state.put_user(user, batch);
        state.bump(batch);
        Ok(())
    }

    /// UserRevokeRole; `root` keeps the `root` role while auth is enabled.
    pub fn apply_user_revoke_role(
        &self,
        name: &str,
        role: &str,
        batch: &mut WriteBatch,
    ) -> Result<(), AuthError> {
        let mut state = self.state.write();
        if state.enabled && name == ROOT && role == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        let mut user = state.user(name)?.clone();
        let at = user
            .roles
            .iter()
            .position(|r| r == role)
            .ok_or(AuthError::RoleNotGranted)?;
        user.roles.remove(at);
        state.put_user(user, batch);
        state.bump(batch);
        Ok(())
    }

    /// RoleAdd.
    pub fn apply_role_add(&self, name: &str, batch: &mut WriteBatch) -> Result<(), AuthError> {
        if name.is_empty() {
            return Err(AuthError::RoleEmpty);
        }
        let mut state = self.state.write();
        if state.roles.contains_key(name) {
            return Err(AuthError::RoleAlreadyExist);
        }
        state.put_role(
            Role {
                name: name.as_bytes().to_vec(),
                key_permission: Vec::new(),
            },
            batch,
        );
        state.bump(batch);
        Ok(())
    }

    /// RoleDelete: also revoked from every user holding it. The `root` role stays while auth is
    /// enabled.
    pub fn apply_role_delete(&self, name: &str, batch: &mut WriteBatch) -> Result<(), AuthError> {
        let mut state = self.state.write();
        if state.enabled && name == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        if state.roles.remove(name).is_none() {
            return Err(AuthError::RoleNotFound);
        }
        batch.delete(AUTH_ROLES_BUCKET, name.as_bytes().to_vec());
        let holders: Vec<User> = state
            .users
            .values()
            .filter(|u| u.roles.iter().any(|r| r == name))
            .cloned()
            .collect();
        for mut user in holders {
            user.roles.retain(|r| r != name);
            state.put_user(user, batch);
        }
        state.bump(batch);
        Ok(())
    }

    /// RoleGrantPermission: a permission on the same key range replaces the old one's type;
    /// permissions stay sorted by key, then range end.
    pub fn apply_role_grant_permission(
        &self,
        r: &AuthRoleGrantPermissionRequest,
        batch: &mut WriteBatch,
    ) -> Result<(), AuthError> {
        let perm = r.perm.as_ref().ok_or(AuthError::PermissionNotGiven)?;
        // etcd 3.6's isValidPermissionRange.
        if perm.key.is_empty()
            || (!perm.range_end.is_empty() && perm.range_end != [0] && perm.range_end <= perm.key)
        {
            return Err(AuthError::InvalidAuthMgmt);
        }
        let mut state = self.state.write();
        let mut role = state
            .roles
            .get(&r.name)
            .cloned()
            .ok_or(AuthError::RoleNotFound)?;
        let at = role
            .key_permission
            .binary_search_by(|p| (&p.key, &p.range_end).cmp(&(&perm.key, &perm.range_end)));
        match at {
            Ok(i) => role.key_permission[i].perm_type = perm.perm_type,
            Err(i) => role.key_permission.insert(i, perm.clone()),
        }
        state.put_role(role, batch);
        state.bump(batch);
        Ok(())
    }

    /// RoleRevokePermission.
    pub fn apply_role_revoke_permission(
        &self,
        r: &AuthRoleRevokePermissionRequest,
        batch: &mut WriteBatch,
    ) -> Result<(), AuthError> {
        let mut state = self.state.write();
        let mut role = state
            .roles
            .get(&r.role)
            .cloned()
            .ok_or(AuthError::RoleNotFound)?;
        let before = role.key_permission.len();
        role.key_permission
            .retain(|p| !(p.key == r.key && p.range_end == r.range_end));
        if role.key_permission.len() == before {
            return Err(AuthError::PermissionNotGranted);
        }
        state.put_role(role, batch);
        state.bump(batch);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
