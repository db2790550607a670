//! The reader and writer against real etcd 3.4 (`/usr/bin/etcd`, `/usr/bin/etcdctl`): a snapshot
//! etcd saved is read here, and a file written here is read and restored by etcd. Skipped, with a
//! printed reason, where etcd is not installed (CI installs it).

use std::fs::{File, OpenOptions};
use std::io::Cursor;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use metastore_bbolt::etcd_schema::{
    self, auth_key, bucket, decode_key_value, decode_lease, decode_u64, KeyBucketKey, KeyValue,
    Revision, Role, User,
};
use metastore_bbolt::status::{snapshot_status, SnapshotStatus};
use metastore_bbolt::{trailer, Db, Writer, DEFAULT_PAGE_SIZE};
use prost::Message;
use serde_json::Value;

const ETCD: &str = "/usr/bin/etcd";
const ETCDCTL: &str = "/usr/bin/etcdctl";

fn etcd_installed() -> bool {
    let found = Path::new(ETCD).exists() && Path::new(ETCDCTL).exists();
    if !found {
        println!("skipped: {ETCD} and {ETCDCTL} are not installed");
    }
    found
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One etcd member on free loopback ports, killed on drop.
struct Etcd {
    child: Child,
    endpoint: String,
    log: PathBuf,
}

/// Flags naming a one-member cluster on `peer` (for `etcd` and `etcdctl snapshot restore`).
fn cluster_flags(peer: &str) -> Vec<String> {
    vec![
        "--name=default".into(),
        format!("--initial-cluster=default={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
    ]
}

impl Etcd {
    /// Starts etcd on `data_dir` (new or restored; `peer` must be the URL it was restored with).
    fn start(data_dir: &Path, peer: &str) -> Self {
        let endpoint = format!("http://127.0.0.1:{}", free_port());
        let log = data_dir.with_extension("log");
        let child = Command::new(ETCD)
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .args(cluster_flags(peer))
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let etcd = Self {
            child,
            endpoint,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !etcd.try_ctl(&["endpoint", "health"]).0 {
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy: {}",
                std::fs::read_to_string(&etcd.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        etcd
    }

    fn try_ctl(&self, args: &[&str]) -> (bool, String) {
        let out = etcdctl(&[&[format!("--endpoints={}", self.endpoint).as_str()], args].concat());
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    fn ctl(&self, args: &[&str]) -> String {
        let (ok, out) = self.try_ctl(args);
        assert!(ok, "etcdctl {args:?}: {out}");
        out
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn etcdctl(args: &[&str]) -> std::process::Output {
    Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .args(["--dial-timeout=5s", "--command-timeout=10s"])
        .args(args)
        .output()
        .unwrap()
}

/// `etcdctl snapshot status -w json` of `file`.
fn etcdctl_status(file: &Path) -> SnapshotStatus {
    let out = etcdctl(&["snapshot", "status", "-w", "json", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    SnapshotStatus {
        hash: json["hash"].as_u64().unwrap() as u32,
        revision: json["revision"].as_i64().unwrap(),
        total_key: json["totalKey"].as_u64().unwrap(),
        total_size: json["totalSize"].as_u64().unwrap(),
    }
}

fn entries(db: &Db<File>, name: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let b = db.bucket(name).unwrap().unwrap_or_else(|| {
        panic!("no bucket {}", String::from_utf8_lossy(name));
    });
    db.iter(&b)
        .map(|e| {
            let e = e.unwrap();
            (e.key, e.value)
        })
        .collect()
}

#[test]
fn a_snapshot_saved_by_etcd_reads_back_with_its_history_lease_and_auth() {
    if !etcd_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(
        &dir.path().join("etcd"),
        &format!("http://127.0.0.1:{}", free_port()),
    );
    // revisions: a=1 @2, b=2 @3, a=3 @4, delete b @5, c=4 @6, compact 4, l (leased) @7
    etcd.ctl(&["put", "a", "1"]);
    etcd.ctl(&["put", "b", "2"]);
    etcd.ctl(&["put", "a", "3"]);
    etcd.ctl(&["del", "b"]);
    etcd.ctl(&["put", "c", "4"]);
    etcd.ctl(&["compact", "4", "--physical"]);
    let granted = etcd.ctl(&["lease", "grant", "600"]);
    let lease_hex = granted.split_whitespace().nth(1).unwrap().to_string();
    let lease_id = i64::from_str_radix(&lease_hex, 16).unwrap();
    etcd.ctl(&["put", "l", "leased", &format!("--lease={lease_hex}")]);
    etcd.ctl(&["role", "add", "root"]);
    etcd.ctl(&["user", "add", "root", "--new-user-password=rootpw"]);
    etcd.ctl(&["user", "grant-role", "root", "root"]);
    etcd.ctl(&["role", "add", "reader"]);
    etcd.ctl(&["role", "grant-permission", "reader", "read", "a", "c"]);
    etcd.ctl(&["user", "add", "alice", "--new-user-password=alicepw"]);
    etcd.ctl(&["user", "grant-role", "alice", "reader"]);
    etcd.ctl(&["auth", "enable"]);
    let file = dir.path().join("etcd.snapshot");
    etcd.ctl(&[
        "--user=root:rootpw",
        "snapshot",
        "save",
        file.to_str().unwrap(),
    ]);
    drop(etcd);

    let db_len = trailer::verify(&mut File::open(&file).unwrap(), false).unwrap();
    let db = Db::open(&file).unwrap();
    assert_eq!(db.size_bytes(), db_len, "the trailer follows the last page");
    assert_eq!(snapshot_status(&db).unwrap(), etcdctl_status(&file));
    assert_eq!(
        db.meta().freelist,
        metastore_bbolt::NO_FREELIST,
        "etcd 3.4 sets NoFreelistSync"
    );
    let names: Vec<Vec<u8>> = db.buckets().unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            bucket::ALARM,
            bucket::AUTH,
            bucket::AUTH_ROLES,
            bucket::AUTH_USERS,
            bucket::CLUSTER,
            bucket::KEY,
            bucket::LEASE,
            bucket::MEMBERS,
            bucket::MEMBERS_REMOVED,
            bucket::META,
        ],
        "the buckets etcd 3.4 creates"
    );
    assert!(etcd_schema::is_etcd_backend(&db).unwrap());

    // history above the compaction, and the last value of each key at it
    let history: Vec<(KeyBucketKey, KeyValue)> = entries(&db, bucket::KEY)
        .into_iter()
        .map(|(k, v)| {
            (
                KeyBucketKey::decode(&k).unwrap(),
                decode_key_value(&v).unwrap(),
            )
        })
        .collect();
    let rev = |main, tombstone| KeyBucketKey {
        revision: Revision { main, sub: 0 },
        tombstone,
    };
    let kv = |key: &str, create, modr, version, value: &str, lease| KeyValue {
        key: key.into(),
        create_revision: create,
        mod_revision: modr,
        version,
        value: value.into(),
        lease,
    };
    assert_eq!(
        history,
        vec![
            (rev(3, false), kv("b", 3, 3, 1, "2", 0)),
            (rev(4, false), kv("a", 2, 4, 2, "3", 0)),
            (rev(5, true), kv("b", 0, 0, 0, "", 0)),
            (rev(6, false), kv("c", 6, 6, 1, "4", 0)),
            (rev(7, false), kv("l", 7, 7, 1, "leased", lease_id)),
        ]
    );
    let meta = etcd_schema::read_meta(&db).unwrap();
    assert_eq!(meta.scheduled_compact_revision, Some(4));
    assert_eq!(meta.finished_compact_revision, Some(4));
    assert!(meta.consistent_index.unwrap() > 7, "{meta:?}");

    let leases = entries(&db, bucket::LEASE);
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].0, etcd_schema::lease_key(lease_id));
    let lease = decode_lease(&leases[0].1).unwrap();
    assert_eq!((lease.id, lease.ttl), (lease_id, 600));

    let auth = entries(&db, bucket::AUTH);
    let auth_value = |key: &[u8]| auth.iter().find(|(k, _)| k == key).unwrap().1.clone();
    assert_eq!(auth_value(auth_key::ENABLED), [1]);
    assert!(decode_u64(&auth_value(auth_key::REVISION)).unwrap() >= 8);
    let users: Vec<User> = entries(&db, bucket::AUTH_USERS)
        .iter()
        .map(|(_, v)| User::decode(v.as_slice()).unwrap())
        .collect();
    assert_eq!(
        users.iter().map(|u| u.name.as_slice()).collect::<Vec<_>>(),
        [b"alice".as_slice(), b"root"]
    );
    assert_eq!(users[0].roles, ["reader"]);
    assert!(users[0].password.starts_with(b"$2a$"), "bcrypt hash");
    let roles: Vec<Role> = entries(&db, bucket::AUTH_ROLES)
        .iter()
        .map(|(_, v)| Role::decode(v.as_slice()).unwrap())
        .collect();
    assert_eq!(roles[0].name, b"reader");
    assert_eq!(roles[0].key_permission[0].key, b"a");
    assert_eq!(roles[0].key_permission[0].range_end, b"c");

    assert_eq!(entries(&db, bucket::MEMBERS).len(), 1);
    let cluster = entries(&db, bucket::CLUSTER);
    assert_eq!(
        cluster,
        [(etcd_schema::CLUSTER_VERSION_KEY.to_vec(), b"3.4.0".to_vec())]
    );
}

/// Keys `key/00000`.. at revisions 2.., every 500th with a value spanning pages, then a deletion.
const KEYS: usize = 3000;
const DELETED: usize = 7;

fn written_key_bucket() -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for i in 0..KEYS {
        let main = i as i64 + 2;
        let value = if i % 500 == 0 {
            vec![b'x'; 3 * DEFAULT_PAGE_SIZE + i]
        } else {
            format!("value-{i}").into_bytes()
        };
        let kv = KeyValue {
            key: format!("key/{i:05}").into_bytes(),
            create_revision: main,
            mod_revision: main,
            version: 1,
            value,
            lease: 0,
        };
        let key = KeyBucketKey {
            revision: Revision { main, sub: 0 },
            tombstone: false,
        };
        out.push((key.encode(), kv.encode_to_vec()));
    }
    let tombstone = KeyBucketKey {
        revision: Revision {
            main: KEYS as i64 + 2,
            sub: 0,
        },
        tombstone: true,
    };
    let kv = KeyValue {
        key: format!("key/{DELETED:05}").into_bytes(),
        ..Default::default()
    };
    out.push((tombstone.encode(), kv.encode_to_vec()));
    out
}

#[test]
fn etcd_checks_and_restores_a_file_written_here() {
    if !etcd_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("written.snapshot");
    let mut out = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&file)
        .unwrap();
    let mut w = Writer::new(&mut out, DEFAULT_PAGE_SIZE).unwrap();
    let last_revision = KEYS as i64 + 2;
    w.bucket(bucket::KEY).unwrap();
    for (k, v) in written_key_bucket() {
        w.put(&k, &v).unwrap();
    }
    w.bucket(bucket::LEASE).unwrap();
    w.bucket(bucket::MEMBERS).unwrap();
    w.bucket(bucket::MEMBERS_REMOVED).unwrap();
    w.bucket(bucket::META).unwrap();
    w.put(etcd_schema::meta_key::CONSISTENT_INDEX, &5u64.to_be_bytes())
        .unwrap();
    let (_, written) = w.finish().unwrap();
    trailer::append(&mut out).unwrap();
    drop(out);

    let ours = snapshot_status(&Db::open(&file).unwrap()).unwrap();
    assert_eq!(
        ours,
        SnapshotStatus {
            hash: ours.hash,
            revision: last_revision,
            total_key: KEYS as u64 + 2,
            total_size: written.size_bytes,
        }
    );
    // several leaves under a branch, and overflow pages
    assert!(written.pages > 50, "{written:?}");
    assert_eq!(
        etcdctl_status(&file),
        ours,
        "bbolt's check passes and the hash agrees"
    );

    // a wrong trailer: etcdctl's refusal and ours read the same
    let mut bytes = std::fs::read(&file).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    let wrong = dir.path().join("wrong-trailer.snapshot");
    std::fs::write(&wrong, &bytes).unwrap();
    let ours = trailer::verify(&mut File::open(&wrong).unwrap(), false).unwrap_err();
    let refused = etcdctl(&[
        "snapshot",
        "restore",
        wrong.to_str().unwrap(),
        &format!("--data-dir={}", dir.path().join("never").display()),
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains(&format!("Error: {ours}")), "{stderr}");
    assert_eq!(
        trailer::verify(&mut File::open(&wrong).unwrap(), true).unwrap(),
        written.size_bytes,
        "--skip-hash-check does not read it"
    );

    let peer = format!("http://127.0.0.1:{}", free_port());
    let data_dir = dir.path().join("restored");
    let mut restore = vec![
        "snapshot".to_string(),
        "restore".into(),
        file.to_str().unwrap().into(),
        format!("--data-dir={}", data_dir.display()),
    ];
    restore.extend(cluster_flags(&peer));
    let out = etcdctl(&restore.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let etcd = Etcd::start(&data_dir, &peer);
    let count = etcd.ctl(&["get", "key/", "--prefix", "--keys-only", "-w", "json"]);
    let json: Value = serde_json::from_str(&count).unwrap();
    assert_eq!(json["count"], KEYS - 1, "all keys but the deleted one");
    assert_eq!(json["header"]["revision"], last_revision);
    assert_eq!(
        etcd.ctl(&["get", "key/01234", "--print-value-only"]).trim(),
        "value-1234"
    );
    let big = etcd.ctl(&["get", "key/02500", "--print-value-only"]);
    assert_eq!(big.trim_end().len(), 3 * DEFAULT_PAGE_SIZE + 2500);
    let deleted = format!("key/{DELETED:05}");
    assert_eq!(etcd.ctl(&["get", &deleted]), "");
    let created = format!("--rev={}", DELETED + 2);
    let old = etcd.ctl(&["get", &deleted, &created, "--print-value-only"]);
    assert_eq!(
        old.trim(),
        format!("value-{DELETED}"),
        "history before the deletion"
    );
}

#[test]
fn etcdctl_and_the_reader_refuse_damaged_files_alike() {
    if !etcd_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut w = Writer::new(Cursor::new(Vec::new()), DEFAULT_PAGE_SIZE).unwrap();
    w.bucket(bucket::KEY).unwrap();
    for (k, v) in written_key_bucket().into_iter().take(200) {
        w.put(&k, &v).unwrap();
    }
    let (out, _) = w.finish().unwrap();
    let mut bytes = out.into_inner();
    let truncated = dir.path().join("truncated");
    std::fs::write(&truncated, &bytes[..bytes.len() - DEFAULT_PAGE_SIZE]).unwrap();
    // a leaf's page id no longer matches its place: bbolt's check and ours both notice
    bytes[3 * DEFAULT_PAGE_SIZE] ^= 0x40;
    let damaged = dir.path().join("damaged");
    std::fs::write(&damaged, &bytes).unwrap();
    for file in [truncated, damaged] {
        let out = etcdctl(&["snapshot", "status", file.to_str().unwrap()]);
        assert!(!out.status.success(), "etcdctl accepted {}", file.display());
        let ours = Db::open(&file).and_then(|db| snapshot_status(&db));
        assert!(ours.is_err(), "{}: {ours:?}", file.display());
    }
}
