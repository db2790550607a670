use std::sync::Arc;

use metastore_proto::authpb::{permission::Type as PermType, Permission, UserAddOptions};
use metastore_proto::etcdserverpb::{
    AuthRoleGrantPermissionRequest, AuthRoleRevokePermissionRequest, AuthUserAddRequest,
};
use metastore_storage::{Backend, WriteBatch};
use metastore_storage_mem::MemBackend;

use super::*;

fn backend() -> Arc<dyn Backend> {
    Arc::new(MemBackend::new(&BUCKETS))
}

/// Applies `f` to the store and commits its batch.
fn apply<T>(
    store: &AuthStore,
    backend: &Arc<dyn Backend>,
    f: impl FnOnce(&AuthStore, &mut WriteBatch) -> Result<T, AuthError>,
) -> Result<T, AuthError> {
    let mut batch = WriteBatch::new();
    let out = f(store, &mut batch)?;
    backend.write(batch).unwrap();
    Ok(out)
}

fn user_add(name: &str, password: &str) -> AuthUserAddRequest {
    AuthUserAddRequest {
        name: name.into(),
        hashed_password: hash_password(password, 4).unwrap(),
        ..Default::default()
    }
}

fn grant(role: &str, key: &str, end: &str, t: PermType) -> AuthRoleGrantPermissionRequest {
    AuthRoleGrantPermissionRequest {
        name: role.into(),
        perm: Some(Permission {
            perm_type: t as i32,
            key: key.into(),
            range_end: end.into(),
        }),
    }
}

fn who(store: &AuthStore, name: &str) -> AuthInfo {
    AuthInfo {
        username: name.into(),
        revision: store.revision(),
    }
}

#[test]
fn enabling_needs_root_with_the_root_role() {
    let (b, s) = (backend(), AuthStore::new());
    assert_eq!(
        apply(&s, &b, |s, w| s.apply_enable(w)),
        Err(AuthError::RootUserNotExist)
    );
    apply(&s, &b, |s, w| s.apply_user_add(&user_add("root", "pw"), w)).unwrap();
    assert_eq!(
        apply(&s, &b, |s, w| s.apply_enable(w)),
        Err(AuthError::RootRoleNotExist)
    );
    apply(&s, &b, |s, w| s.apply_user_grant_role("root", "root", w)).unwrap();
    apply(&s, &b, |s, w| s.apply_enable(w)).unwrap();
    assert!(s.is_enabled());
    // Root cannot be removed or lose its role while auth is on.
    assert_eq!(
        apply(&s, &b, |s, w| s.apply_user_delete("root", w)),
        Err(AuthError::InvalidAuthMgmt)
    );
    assert_eq!(
        apply(&s, &b, |s, w| s.apply_user_revoke_role("root", "root", w)),
        Err(AuthError::InvalidAuthMgmt)
    );
    assert_eq!(
        apply(&s, &b, |s, w| s.apply_role_delete("root", w)),
        Err(AuthError::InvalidAuthMgmt)
    );
}

#[test]
fn key_permissions_are_checked_by_range_and_type() {
    let (b, s) = (backend(), AuthStore::new());
    for (name, pw) in [("root", "r"), ("alice", "a")] {
        apply(&s, &b, |s, w| s.apply_user_add(&user_add(name, pw), w)).unwrap();
    }
    apply(&s, &b, |s, w| s.apply_user_grant_role("root", "root", w)).unwrap();
    apply(&s, &b, |s, w| s.apply_role_add("reader", w)).unwrap();
    apply(&s, &b, |s, w| {
        s.apply_role_grant_permission(&grant("reader", "/a/", "/a0", PermType::Read), w)
    })
    .unwrap();
    apply(&s, &b, |s, w| s.apply_user_grant_role("alice", "reader", w)).unwrap();
    // Disabled: everything passes, even without a user.
    assert!(s.check(&AuthInfo::default(), &[Need::Admin]).is_ok());
    apply(&s, &b, |s, w| s.apply_enable(w)).unwrap();

    let alice = who(&s, "alice");
    assert!(s.check(&alice, &[Need::Read(b"/a/x", b"")]).is_ok());
    assert!(s.check(&alice, &[Need::Read(b"/a/", b"/a0")]).is_ok());
    assert_eq!(
        s.check(&alice, &[Need::Write(b"/a/x", b"")]),
        Err(AuthError::PermissionDenied)
    );
    assert_eq!(
        s.check(&alice, &[Need::Read(b"/b", b"")]),
        Err(AuthError::PermissionDenied)
    );
    assert_eq!(
        s.check(&alice, &[Need::Read(b"/a/", b"/b")]),
        Err(AuthError::PermissionDenied)
    );
    assert_eq!(
        s.check(&alice, &[Need::Admin]),
        Err(AuthError::PermissionDenied)
    );
    assert!(s.check(&alice, &[Need::Authenticated]).is_ok());
    assert_eq!(
        s.check(&AuthInfo::default(), &[Need::Authenticated]),
        Err(AuthError::UserEmpty)
    );
    let root = who(&s, "root");
    assert!(s
        .check(&root, &[Need::Admin, Need::Write(b"\0", b"\0")])
        .is_ok());
    let ghost = who(&s, "ghost");
    assert_eq!(
        s.check(&ghost, &[Need::Admin]),
        Err(AuthError::UserNotFound)
    );
    assert_eq!(
        s.check(&ghost, &[Need::Read(b"/a/x", b"")]),
        Err(AuthError::PermissionDenied)
    );

    // A revoked permission: the old revision is refused, the new one denied.
    let before = alice.clone();
    let revoke = AuthRoleRevokePermissionRequest {
        role: "reader".into(),
        key: b"/a/".to_vec(),
        range_end: b"/a0".to_vec(),
    };
    apply(&s, &b, |s, w| s.apply_role_revoke_permission(&revoke, w)).unwrap();
    assert_eq!(
        s.check(&before, &[Need::Read(b"/a/x", b"")]),
        Err(AuthError::OldRevision)
    );
    // Admin checks ignore the revision, as etcd's IsAdminPermitted does.
    let old_root = AuthInfo {
        revision: 1,
        ..root
    };
    assert!(s.check(&old_root, &[Need::Admin]).is_ok());
    assert_eq!(
        s.check(&old_root, &[Need::Write(b"k", b"")]),
        Err(AuthError::OldRevision)
    );
    assert_eq!(
        s.check(&who(&s, "alice"), &[Need::Read(b"/a/x", b"")]),
        Err(AuthError::PermissionDenied)
    );
    assert_eq!(
        apply(&s, &b, |s, w| s.apply_role_revoke_permission(&revoke, w)),
        Err(AuthError::PermissionNotGranted)
    );
}

#[test]
fn state_survives_a_reload_and_role_delete_revokes_it_from_users() {
    let (b, s) = (backend(), AuthStore::new());
    apply(&s, &b, |s, w| s.apply_user_add(&user_add("root", "r"), w)).unwrap();
    apply(&s, &b, |s, w| s.apply_user_grant_role("root", "root", w)).unwrap();
    apply(&s, &b, |s, w| s.apply_user_add(&user_add("bob", "b"), w)).unwrap();
    let nopass = AuthUserAddRequest {
        name: "svc".into(),
        options: Some(UserAddOptions { no_password: true }),
        ..Default::default()
    };
    apply(&s, &b, |s, w| s.apply_user_add(&nopass, w)).unwrap();
    apply(&s, &b, |s, w| s.apply_role_add("w", w)).unwrap();
    apply(&s, &b, |s, w| s.apply_role_add("a", w)).unwrap();
    apply(&s, &b, |s, w| s.apply_user_grant_role("bob", "w", w)).unwrap();
    apply(&s, &b, |s, w| s.apply_user_grant_role("bob", "a", w)).unwrap();
    apply(&s, &b, |s, w| s.apply_user_grant_role("bob", "a", w)).unwrap();
    assert_eq!(
        apply(&s, &b, |s, w| s.apply_user_grant_role("bob", "zz", w)),
        Err(AuthError::RoleNotFound)
    );
    apply(&s, &b, |s, w| s.apply_enable(w)).unwrap();
    assert_eq!(s.user_get("bob").unwrap(), vec!["a", "w"]);
    assert_eq!(
        apply(&s, &b, |s, w| s.apply_user_add(&user_add("bob", "x"), w)),
        Err(AuthError::UserAlreadyExist)
    );
    assert_eq!(
        apply(&s, &b, |s, w| s.apply_role_add("", w)),
        Err(AuthError::RoleEmpty)
    );
    assert_eq!(
        apply(&s, &b, |s, w| s.apply_user_add(&user_add("", "x"), w)),
        Err(AuthError::UserEmpty)
    );

    let reloaded = AuthStore::new();
    reloaded.load(&*b.snapshot().unwrap()).unwrap();
    assert!(reloaded.is_enabled());
    assert_eq!(reloaded.revision(), s.revision());
    assert_eq!(reloaded.user_list(), vec!["bob", "root", "svc"]);
    assert_eq!(reloaded.role_list(), vec!["a", "w"]);
    assert!(reloaded.check_password("bob", "b").is_ok());
    assert_eq!(
        reloaded.check_password("bob", "x"),
        Err(AuthError::AuthFailed)
    );
    assert_eq!(
        reloaded.check_password("nobody", "x"),
        Err(AuthError::AuthFailed)
    );
    assert_eq!(
        reloaded.check_password("svc", ""),
        Err(AuthError::NoPasswordUser)
    );
    // Nothing in clear: the stored password is a bcrypt hash.
    let raw = b
        .snapshot()
        .unwrap()
        .get(AUTH_USERS_BUCKET, b"bob")
        .unwrap()
        .unwrap();
    let user = User::decode(raw.as_slice()).unwrap();
    assert!(String::from_utf8_lossy(&user.password).starts_with("$2"));

    apply(&s, &b, |s, w| s.apply_role_delete("w", w)).unwrap();
    assert_eq!(s.user_get("bob").unwrap(), vec!["a"]);
}

#[test]
fn tokens_issued_by_authenticate_die_with_a_password_change() {
    let (b, s) = (backend(), AuthStore::new());
    apply(&s, &b, |s, w| s.apply_user_add(&user_add("root", "r"), w)).unwrap();
    apply(&s, &b, |s, w| s.apply_user_grant_role("root", "root", w)).unwrap();
    assert_eq!(
        s.apply_authenticate("root", "p", 9).unwrap_err(),
        AuthError::NotEnabled
    );
    apply(&s, &b, |s, w| s.apply_enable(w)).unwrap();
    let (token, _) = s.apply_authenticate("root", "abcdefghabcdefgh", 9).unwrap();
    let token = token.unwrap();
    assert_eq!(token, "abcdefghabcdefgh.9");
    assert_eq!(s.simple_tokens().lookup(&token).as_deref(), Some("root"));
    let hash = hash_password("new", 4).unwrap();
    apply(&s, &b, |s, w| {
        s.apply_user_change_password("root", &hash, w)
    })
    .unwrap();
    assert_eq!(s.simple_tokens().lookup(&token), None);
    assert_eq!(
        s.apply_authenticate("ghost", "p", 10).unwrap_err(),
        AuthError::AuthFailed
    );
}
