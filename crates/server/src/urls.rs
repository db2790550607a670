//! URLs as etcd takes them in its flags: `http(s)://host:port` with a host name, an IPv4 address
//! or a bracketed IPv6 literal, and `unix://path` / `unixs://path` for client listeners.
//!
//! The rules follow etcd's `types.NewURLs`: the scheme is one of http, https, unix, unixs; an
//! http(s) URL has the form `host:port` and no path; a unix URL names a socket file, its host
//! and path joined (`unix:///run/etcd.sock` → `/run/etcd.sock`, `unix://localhost:2379` → a file
//! `localhost:2379` in the working directory, as etcd does). Every error names the flag.
//!
//! Hand-written rather than the `url` crate: the grammar is this small, and `url` would bring
//! IDNA and Unicode tables into the binary for nothing.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

/// One URL of a flag, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// The URL as given (etcd derives member ids from these strings).
    pub text: String,
    pub scheme: Scheme,
    /// For http(s): the host (name, IPv4, or IPv6 without brackets) and the port.
    pub host: String,
    pub port: u16,
    /// For unix(s): the socket file.
    pub socket: Option<PathBuf>,
}

/// The URL schemes etcd accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
    Unix,
    Unixs,
}

impl Scheme {
    /// Whether connections are TLS.
    pub fn tls(self) -> bool {
        matches!(self, Scheme::Https | Scheme::Unixs)
    }
}

/// Where a listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Bind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bind::Tcp(addr) => write!(f, "{addr}"),
            Bind::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Url {
    /// Parses one URL of `flag`.
    pub fn parse(flag: &str, text: &str) -> Result<Url> {
        let text = text.trim();
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| anyhow!("{flag}: {text:?} is not a URL (expected scheme://host:port, e.g. http://127.0.0.1:2379)"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            "unix" => Scheme::Unix,
            "unixs" => Scheme::Unixs,
            _ => bail!("{flag}: URL scheme must be http, https, unix, or unixs: {text}"),
        };
        if matches!(scheme, Scheme::Unix | Scheme::Unixs) {
            if rest.is_empty() {
                bail!("{flag}: {text:?} names no socket file");
            }
            return Ok(Url {
                text: text.to_string(),
                scheme,
                host: String::new(),
                port: 0,
                socket: Some(PathBuf::from(rest)),
            });
        }
        // One trailing slash is tolerated (`http://host:2379/`); any other path is refused.
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            bail!("{flag}: URL must not contain a path: {text}");
        }
        if authority.contains('@') {
            bail!("{flag}: URL must not contain user information: {text}");
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| {
            anyhow!("{flag}: URL address does not have the form \"host:port\": {text}")
        })?;
        Ok(Url {
            text: text.to_string(),
            scheme,
            host,
            port,
            socket: None,
        })
    }

    /// Where to listen for this URL: a unix socket, or the host resolved now (a name resolving
    /// to several addresses binds the first IPv4 one, else the first, as Go's `net.Listen`).
    pub async fn bind(&self, flag: &str) -> Result<Bind> {
        if let Some(socket) = &self.socket {
            return Ok(Bind::Unix(socket.clone()));
        }
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(Bind::Tcp(SocketAddr::new(ip, self.port)));
        }
        // The runtime's resolver (getaddrinfo on a blocking thread), not a resolve on this task.
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| {
                anyhow!(
                    "{flag}: cannot resolve {:?} in {}: {e}",
                    self.host,
                    self.text
                )
            })?
            .collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .map(Bind::Tcp)
            .ok_or_else(|| {
                anyhow!(
                    "{flag}: {:?} in {} resolves to no address",
                    self.host,
                    self.text
                )
            })
    }
}

/// `host:port` with a bracketed IPv6 literal or a host without colons; the port a u16.
fn split_host_port(authority: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        v6.parse::<std::net::Ipv6Addr>().ok()?;
        (v6, after.strip_prefix(':')?)
    } else {
        let (host, port) = authority.rsplit_once(':')?;
        if host.contains(':') {
            return None; // an IPv6 literal must be bracketed
        }
        (host, port)
    };
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._:%".contains(c))
    {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

/// Parses every URL of a flag; at least one is required.
pub fn parse_all(flag: &str, urls: &[String]) -> Result<Vec<Url>> {
    let urls: Vec<Url> = urls
        .iter()
        .filter(|u| !u.trim().is_empty())
        .map(|u| Url::parse(flag, u))
        .collect::<Result<_>>()?;
    if urls.is_empty() {
        bail!("{flag}: at least one URL is required");
    }
    Ok(urls)
}

/// Parses a flag whose URLs must be http(s) (peer URLs: raft traffic goes over TCP).
pub fn parse_tcp(flag: &str, urls: &[String]) -> Result<Vec<Url>> {
    let urls = parse_all(flag, urls)?;
    if let Some(u) = urls.iter().find(|u| u.socket.is_some()) {
        bail!(
            "{flag}: unix sockets are supported for client URLs only: {}",
            u.text
        );
    }
    Ok(urls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(text: &str) -> (Scheme, String, u16) {
        let u = Url::parse("--flag", text).unwrap();
        (u.scheme, u.host, u.port)
    }

    fn err(text: &str) -> String {
        format!(
            "{:#}",
            Url::parse("--listen-client-urls", text).unwrap_err()
        )
    }

    #[test]
    fn host_names_ips_and_ipv6_literals_parse() {
        assert_eq!(
            tcp("http://127.0.0.1:2379"),
            (Scheme::Http, "127.0.0.1".into(), 2379)
        );
        assert_eq!(
            tcp("https://etcd-0.etcd:2380"),
            (Scheme::Https, "etcd-0.etcd".into(), 2380)
        );
        assert_eq!(
            tcp("http://localhost:2379/"),
            (Scheme::Http, "localhost".into(), 2379)
        );
        assert_eq!(tcp("http://[::1]:2379"), (Scheme::Http, "::1".into(), 2379));
        assert_eq!(
            tcp("HTTP://10.0.0.1:1"),
            (Scheme::Http, "10.0.0.1".into(), 1)
        );
        assert_eq!(tcp(" http://a:1 "), (Scheme::Http, "a".into(), 1));
    }

    #[tokio::test]
    async fn unix_urls_name_a_socket_file_as_etcd_does() {
        let u = Url::parse("--listen-client-urls", "unix:///run/etcd.sock").unwrap();
        assert_eq!(
            u.socket.as_deref(),
            Some(std::path::Path::new("/run/etcd.sock"))
        );
        assert!(!u.scheme.tls());
        let u = Url::parse("--listen-client-urls", "unixs://localhost:2379").unwrap();
        assert_eq!(
            u.socket.as_deref(),
            Some(std::path::Path::new("localhost:2379"))
        );
        assert!(u.scheme.tls());
        assert_eq!(
            u.bind("--listen-client-urls").await.unwrap(),
            Bind::Unix("localhost:2379".into())
        );
    }

    #[test]
    fn malformed_urls_are_refused_naming_the_flag() {
        assert_eq!(
            err("127.0.0.1:2379"),
            "--listen-client-urls: \"127.0.0.1:2379\" is not a URL (expected scheme://host:port, e.g. http://127.0.0.1:2379)"
        );
        assert_eq!(
            err("ftp://127.0.0.1:2379"),
            "--listen-client-urls: URL scheme must be http, https, unix, or unixs: ftp://127.0.0.1:2379"
        );
        for bad in [
            "http://nohost",
            "http://host:",
            "http://host:99999",
            "http://:2379",
            "http://::1:2379",
            "http://[::1]",
            "http://[nothex]:1",
            "http://a b:1",
        ] {
            assert!(
                err(bad).starts_with(
                    "--listen-client-urls: URL address does not have the form \"host:port\""
                ),
                "{bad}: {}",
                err(bad)
            );
        }
        assert_eq!(
            err("http://127.0.0.1:2379/v3"),
            "--listen-client-urls: URL must not contain a path: http://127.0.0.1:2379/v3"
        );
        assert!(err("unix://").contains("names no socket file"));
        assert!(format!(
            "{:#}",
            parse_tcp("--listen-peer-urls", &["unix:///x".into()]).unwrap_err()
        )
        .contains("--listen-peer-urls: unix sockets are supported for client URLs only"));
        assert!(format!(
            "{:#}",
            parse_all("--advertise-client-urls", &[]).unwrap_err()
        )
        .contains("--advertise-client-urls: at least one URL is required"));
    }

    #[tokio::test]
    async fn binding_resolves_host_names_and_keeps_literals() {
        async fn bind(t: &str) -> Bind {
            Url::parse("--f", t).unwrap().bind("--f").await.unwrap()
        }
        assert_eq!(
            bind("http://127.0.0.1:2379").await,
            Bind::Tcp("127.0.0.1:2379".parse().unwrap())
        );
        assert_eq!(
            bind("http://[::1]:2379").await,
            Bind::Tcp("[::1]:2379".parse().unwrap())
        );
        // localhost resolves through the system resolver; its IPv4 address is preferred.
        assert_eq!(
            bind("http://localhost:2379").await,
            Bind::Tcp("127.0.0.1:2379".parse().unwrap())
        );
        let unknown = Url::parse("--f", "http://no-such-host.invalid:1").unwrap();
        assert!(format!(
            "{:#}",
            unknown.bind("--listen-peer-urls").await.unwrap_err()
        )
        .starts_with("--listen-peer-urls: cannot resolve \"no-such-host.invalid\""));
    }
}
