//! etcd 3.5 for the snapshot compatibility tests (`tests/etcd35.rs`), next to the system's etcd
//! (Debian bookworm packages 3.4, which stays on `PATH` for every other test).
//!
//! Debian trixie packages etcd 3.5: the current `etcd-server` and `etcd-client` files are looked up
//! in trixie's `Packages` index (not hard-coded, as the archive drops superseded versions), fetched
//! with curl, checked against the index's SHA-256 and unpacked with `dpkg-deb -x` into
//! `<target dir>/etcd-3.5/`, never installed. The tests find the binaries through
//! [`DIR_VAR`]; when the download is impossible (no network, no curl or dpkg-deb) xtask says
//! why and runs the tests anyway, and those tests fail naming this step.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The variable the tests read: the directory holding `etcd`, `etcdctl` and `etcdutl` 3.5.
pub const DIR_VAR: &str = "METASTORE_ETCD35_DIR";

const MIRROR: &str = "http://deb.debian.org/debian";
const SUITE: &str = "trixie";
const PACKAGES: [&str; 2] = ["etcd-server", "etcd-client"];
const BINARIES: [&str; 3] = ["etcd", "etcdctl", "etcdutl"];

/// One package's entry in a Debian `Packages` index.
#[derive(Debug, PartialEq)]
struct Deb {
    version: String,
    filename: String,
    sha256: String,
}

/// The entry of `package` in a `Packages` index (stanzas separated by blank lines).
fn find_package(index: &str, package: &str) -> Option<Deb> {
    index.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(": "))
                    .map(str::trim)
                    .map(str::to_string)
            })
        };
        (field("Package")? == package).then_some(())?;
        Some(Deb {
            version: field("Version")?,
            filename: field("Filename")?,
            sha256: field("SHA256")?,
        })
    })
}

fn debian_arch() -> Result<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" => Ok("amd64"),
        "aarch64" => Ok("arm64"),
        other => bail!("no Debian etcd 3.5 packages for {other} are looked up"),
    }
}

/// `curl` of `url` into memory, failing on HTTP errors.
fn download(url: &str) -> Result<Vec<u8>> {
    let out = Command::new("curl")
        .args(["-sSfL", "--retry", "2", "--connect-timeout", "15", url])
        .stdin(Stdio::null())
        .output()
        .context("could not run curl")?;
    if !out.status.success() {
        bail!(
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn gunzip(bytes: &[u8]) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("could not run gzip")?;
    let mut stdin = child.stdin.take().context("gzip's stdin")?;
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writing to gzip"))??;
    if !out.status.success() {
        bail!("gzip -dc of the Packages index failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `dir` holds the three binaries, and `etcd` says it is 3.5.
fn complete(dir: &Path) -> bool {
    BINARIES.iter().all(|b| dir.join(b).is_file())
        && Command::new(dir.join("etcd"))
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("etcd Version: 3.5."))
            .unwrap_or(false)
}

/// The directory of etcd 3.5's binaries under `target`, downloading them first if needed.
pub fn ensure(target: &Path) -> Result<PathBuf> {
    let root = target.join("etcd-3.5");
    let bin = root.join("usr").join("bin");
    if complete(&bin) {
        return Ok(bin);
    }
    let arch = debian_arch()?;
    let index_url = format!("{MIRROR}/dists/{SUITE}/main/binary-{arch}/Packages.gz");
    eprintln!("xtask: fetching etcd 3.5 (Debian {SUITE}) for tests/etcd35.rs: {index_url}");
    let index = gunzip(&download(&index_url)?)?;
    let staging = target.join("etcd-3.5.partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    for package in PACKAGES {
        let deb = find_package(&index, package)
            .with_context(|| format!("{package} is not in {index_url}"))?;
        if !deb.version.starts_with("3.5.") {
            bail!(
                "{SUITE}'s {package} is {}, not 3.5: update SUITE in xtask/src/etcd35.rs",
                deb.version
            );
        }
        let url = format!("{MIRROR}/{}", deb.filename);
        eprintln!("xtask: fetching {url}");
        let bytes = download(&url)?;
        let digest = format!("{:x}", Sha256::digest(&bytes));
        if digest != deb.sha256 {
            bail!("{url}: SHA-256 {digest}, the index says {}", deb.sha256);
        }
        let file = staging.join(format!("{package}.deb"));
        std::fs::write(&file, &bytes)?;
        let unpacked = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&file)
            .arg(&staging)
            .status()
            .context("could not run dpkg-deb")?;
        if !unpacked.success() {
            bail!("dpkg-deb -x {} failed", file.display());
        }
        std::fs::remove_file(&file)?;
    }
    if !complete(&staging.join("usr").join("bin")) {
        bail!("the packages did not hold {BINARIES:?} of etcd 3.5");
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&staging, &root)?;
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &str = "Package: etcd-client\nSource: etcd\nVersion: 3.5.16-4\n\
        Filename: pool/main/e/etcd/etcd-client_3.5.16-4_amd64.deb\nSize: 1\n\
        SHA256: 7eb6\n\n\
        Package: etcd-server\nVersion: 3.5.16-4\n\
        Filename: pool/main/e/etcd/etcd-server_3.5.16-4_amd64.deb\n\
        SHA256: 0875\nDescription: x\n\n\
        Package: etcd-server-dbgsym\nVersion: 1\nFilename: f\nSHA256: 00\n";

    #[test]
    fn the_index_entry_of_a_package_is_found_by_its_exact_name() {
        assert_eq!(
            find_package(INDEX, "etcd-server"),
            Some(Deb {
                version: "3.5.16-4".into(),
                filename: "pool/main/e/etcd/etcd-server_3.5.16-4_amd64.deb".into(),
                sha256: "0875".into(),
            })
        );
        assert_eq!(find_package(INDEX, "etcd-client").unwrap().sha256, "7eb6");
        assert_eq!(find_package(INDEX, "etcd"), None);
    }
}
