//! Where the configuration comes from, as etcd takes it: command-line flags, `ETCD_<FLAG>`
//! environment variables, or a YAML file named by `--config-file` (or `ETCD_CONFIG_FILE`)
//! whose keys are the flag names (etcd's `etcd.conf.yml.sample`).
//!
//! Every source is turned into command-line arguments and parsed by the one clap definition in
//! `config.rs`, so that defaults, value checks and error messages are the same whatever the
//! source. The rules, checked against etcd 3.4:
//! - A flag beats the default; an `ETCD_<FLAG>` variable fills a flag that is not on the
//!   command line. A variable *and* the flag it names is refused with etcd's own message
//!   (etcd exits with it too).
//! - `ETCD_*` variables that name no flag are warned about, as etcd does (Kubernetes sets
//!   `ETCD_SERVICE_HOST` and the like for a service named `etcd`, so refusing them would break
//!   pods).
//! - With a config file, etcd silently ignores every other flag and variable. MetaStore refuses
//!   the mix instead, naming what would have been ignored: a setting that is silently dropped is
//!   how an operator ends up with the wrong data directory.
//! - Keys of the file that name no flag are refused, naming them (etcd ignores them, which hides
//!   typos).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use yaml_rust2::{Yaml, YamlLoader};

use crate::config::Config;

/// The prefix of etcd's environment variables.
const ENV_PREFIX: &str = "ETCD_";

/// Keys of etcd's config file that hold a group of flags: `client-transport-security:
/// {cert-file: …}` sets `--cert-file`, and `peer-transport-security: {cert-file: …}` sets
/// `--peer-cert-file`.
const TLS_GROUPS: [(&str, &str); 2] = [
    ("client-transport-security", ""),
    ("peer-transport-security", "peer-"),
];

/// Flags whose value is a duration: in etcd's YAML (decoded into Go's `time.Duration`) a bare
/// number counts nanoseconds.
const DURATION_FLAGS: [&str; 3] = [
    "experimental-watch-progress-notify-interval",
    "experimental-corrupt-check-time",
    "experimental-compaction-sleep-interval",
];

/// The configuration and the warnings to log once logging is set up.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// Reads the configuration from `args` (the program name first) and `env` (the process's
/// environment, as name/value pairs).
pub fn load(
    args: impl IntoIterator<Item = OsString>,
    env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<Loaded> {
    let args: Vec<OsString> = args.into_iter().collect();
    let command = Config::command();
    let flags: BTreeSet<String> = command
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        // Not settings: ETCD_VERSION (which some images set to the etcd release) must not
        // turn a start into a version print.
        .filter(|l| l != "help" && l != "version")
        .collect();
    // clap prints help, or the error of a bad command line, and exits, as etcd does.
    let matches = command
        .try_get_matches_from(&args)
        .unwrap_or_else(|e| e.exit());
    let on_command_line: Vec<String> = flags
        .iter()
        .filter(|f| matches.value_source(&f.replace('-', "_")) == Some(ValueSource::CommandLine))
        .cloned()
        .collect();

    let mut warnings = Vec::new();
    let mut from_env: Vec<(String, String, String)> = Vec::new(); // (variable, flag, value)
    for (name, value) in env {
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let value = value
            .into_string()
            .map_err(|_| anyhow!("environment variable {name} is not valid UTF-8"))?;
        let flag = rest.to_ascii_lowercase().replace('_', "-");
        if flags.contains(&flag) {
            from_env.push((name.to_string(), flag, value));
        } else {
            warnings.push(format!("unrecognized environment variable {name}={value}"));
        }
    }
    from_env.sort();

    let config_file = if on_command_line.iter().any(|f| f == "config-file") {
        matches
            .get_one::<std::path::PathBuf>("config_file")
            .cloned()
    } else {
        from_env
            .iter()
            .find(|(_, flag, _)| flag == "config-file")
            .map(|(_, _, v)| v.into())
    };

    let program = args
        .first()
        .cloned()
        .unwrap_or_else(|| OsString::from("metastore"));
    let config = match config_file {
        Some(path) => {
            let others: Vec<String> = on_command_line
                .iter()
                .filter(|f| *f != "config-file")
                .map(|f| format!("--{f}"))
                .chain(
                    from_env
                        .iter()
                        .filter(|(_, f, _)| f != "config-file")
                        .map(|(v, _, _)| v.clone()),
                )
                .collect();
            if !others.is_empty() {
                bail!(
                    "--config-file {}: cannot be combined with other flags or ETCD_* variables \
                     (etcd would ignore them): {}",
                    path.display(),
                    others.join(", ")
                );
            }
            let mut argv = vec![program];
            argv.extend(file_args(&path, &flags)?.into_iter().map(OsString::from));
            Config::try_parse_from(argv).map_err(|e| {
                anyhow!(
                    "config file {}: {}",
                    path.display(),
                    first_line(&e.to_string())
                )
            })?
        }
        None => {
            let mut argv = args;
            for (variable, flag, value) in &from_env {
                if on_command_line.contains(flag) {
                    // etcd's words (pkg/flags), and like etcd we stop.
                    bail!(
                        "conflicting environment variable {variable:?} is shadowed by \
                         corresponding command-line flag (either unset environment variable or \
                         disable flag)"
                    );
                }
                argv.push(format!("--{flag}={value}").into());
            }
            let matches = Config::command().try_get_matches_from(argv).map_err(|e| {
                anyhow!(
                    "in ETCD_* environment variables: {}",
                    first_line(&e.to_string())
                )
            })?;
            Config::from_arg_matches(&matches)?
        }
    };
    Ok(Loaded { config, warnings })
}

/// The first line of a clap error, without its `error: ` prefix (the rest is usage help about
/// a command line the user did not type).
fn first_line(text: &str) -> &str {
    let line = text.lines().next().unwrap_or(text);
    line.strip_prefix("error: ").unwrap_or(line)
}

/// The command-line arguments a config file stands for.
fn file_args(path: &Path, flags: &BTreeSet<String>) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let docs = YamlLoader::load_from_str(&text)
        .with_context(|| format!("config file {} is not valid YAML", path.display()))?;
    let mut args = Vec::new();
    let mut unknown = Vec::new();
    match docs.as_slice() {
        [] | [Yaml::Null] => {}
        [Yaml::Hash(map)] => {
            for (key, value) in map {
                let key = scalar(key).ok_or_else(|| {
                    anyhow!("config file {}: a key is not a string", path.display())
                })?;
                if let Some((_, prefix)) = TLS_GROUPS.iter().find(|(group, _)| *group == key) {
                    match value {
                        Yaml::Null => {}
                        Yaml::Hash(group) => {
                            for (k, v) in group {
                                let k = scalar(k).unwrap_or_default();
                                let flag = format!("{prefix}{k}");
                                if flags.contains(&flag) && k != "config-file" {
                                    push_arg(&mut args, &flag, v, path)?;
                                } else {
                                    unknown.push(format!("{key}.{k}"));
                                }
                            }
                        }
                        _ => bail!(
                            "config file {}: {key} must be a mapping of TLS settings",
                            path.display()
                        ),
                    }
                } else if flags.contains(&key) && key != "config-file" {
                    push_arg(&mut args, &key, value, path)?;
                } else {
                    unknown.push(key);
                }
            }
        }
        [_] => bail!(
            "config file {}: expected a mapping of etcd configuration keys",
            path.display()
        ),
        _ => bail!(
            "config file {}: holds several YAML documents, expected one",
            path.display()
        ),
    }
    if !unknown.is_empty() {
        bail!(
            "config file {}: unknown keys (no such etcd flag, or one MetaStore does not \
             implement): {}",
            path.display(),
            unknown.join(", ")
        );
    }
    Ok(args)
}

/// Adds `--flag=value` for one key of the file; a null value (`key:` with nothing after it, as
/// etcd's sample writes an unset key) adds nothing.
fn push_arg(args: &mut Vec<String>, flag: &str, value: &Yaml, path: &Path) -> Result<()> {
    let text = match value {
        Yaml::Null => return Ok(()),
        Yaml::Integer(n) if DURATION_FLAGS.contains(&flag) => format!("{n}ns"),
        Yaml::Array(items) => items
            .iter()
            .map(|i| scalar(i).ok_or(()))
            .collect::<Result<Vec<_>, ()>>()
            .map_err(|()| {
                anyhow!(
                    "config file {}: {flag} must be a list of plain values",
                    path.display()
                )
            })?
            .join(","),
        other => scalar(other).ok_or_else(|| {
            anyhow!(
                "config file {}: {flag} must be a plain value",
                path.display()
            )
        })?,
    };
    args.push(format!("--{flag}={text}"));
    Ok(())
}

/// A YAML scalar as the text a flag would take.
fn scalar(value: &Yaml) -> Option<String> {
    match value {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(n) => Some(n.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(args: &[&str], env: &[(&str, &str)]) -> Result<Loaded> {
        load(
            std::iter::once("metastore")
                .chain(args.iter().copied())
                .map(OsString::from),
            env.iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
    }

    fn err(args: &[&str], env: &[(&str, &str)]) -> String {
        format!("{:#}", load_with(args, env).unwrap_err())
    }

    fn yaml_file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn environment_fills_flags_not_on_the_command_line() {
        let loaded = load_with(
            &["--name", "flag"],
            &[
                ("ETCD_DATA_DIR", "/var/lib/x"),
                (
                    "ETCD_LISTEN_CLIENT_URLS",
                    "http://127.0.0.1:1,http://127.0.0.1:2",
                ),
                ("ETCD_CLIENT_CERT_AUTH", "true"),
                ("ETCD_SNAPSHOT_COUNT", "10000"),
                ("ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL", "5s"),
                ("HOME", "/root"),
            ],
        )
        .unwrap();
        let c = loaded.config;
        assert_eq!(c.name, "flag");
        assert_eq!(c.data_dir.unwrap(), Path::new("/var/lib/x"));
        assert_eq!(
            c.listen_client_urls,
            ["http://127.0.0.1:1", "http://127.0.0.1:2"]
        );
        assert!(c.client_cert_auth);
        assert_eq!(c.snapshot_count, 10000);
        assert_eq!(
            c.experimental_watch_progress_notify_interval,
            std::time::Duration::from_secs(5)
        );
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    }

    #[test]
    fn a_variable_shadowed_by_its_flag_is_refused_with_etcds_message() {
        assert_eq!(
            err(&["--name", "flag"], &[("ETCD_NAME", "env")]),
            "conflicting environment variable \"ETCD_NAME\" is shadowed by corresponding \
             command-line flag (either unset environment variable or disable flag)"
        );
    }

    #[test]
    fn unknown_variables_are_warnings_and_bad_values_name_the_source() {
        let loaded = load_with(&[], &[("ETCD_SERVICE_HOST", "10.0.0.1")]).unwrap();
        assert_eq!(
            loaded.warnings,
            ["unrecognized environment variable ETCD_SERVICE_HOST=10.0.0.1"]
        );
        let e = err(&[], &[("ETCD_SNAPSHOT_COUNT", "many")]);
        assert!(e.starts_with("in ETCD_* environment variables"), "{e}");
        assert!(e.contains("many"), "{e}");
    }

    #[test]
    fn config_file_keys_are_flag_names_with_tls_groups() {
        let f = yaml_file(
            "# as etcd.conf.yml.sample writes it\n\
             name: 'infra0'\n\
             data-dir: /var/lib/etcd\n\
             initial-cluster:\n\
             snapshot-count: 10000\n\
             heartbeat-interval: 100\n\
             election-timeout: 1000\n\
             quota-backend-bytes: 0\n\
             listen-client-urls: http://localhost:2379,unix:///tmp/m.sock\n\
             initial-cluster-state: 'new'\n\
             experimental-watch-progress-notify-interval: 5000000000\n\
             experimental-corrupt-check-time: 2m\n\
             client-transport-security:\n  cert-file: /c.crt\n  key-file: /c.key\n  client-cert-auth: true\n  trusted-ca-file: /ca.crt\n\
             peer-transport-security:\n  cert-file: /p.crt\n  key-file: /p.key\n  client-cert-auth: false\n",
        );
        let path = f.path().to_str().unwrap();
        for loaded in [
            load_with(&["--config-file", path], &[]).unwrap(),
            load_with(&[], &[("ETCD_CONFIG_FILE", path)]).unwrap(),
        ] {
            let c = loaded.config;
            assert_eq!(c.name, "infra0");
            assert_eq!(c.data_dir.as_deref(), Some(Path::new("/var/lib/etcd")));
            assert_eq!(c.snapshot_count, 10000);
            assert_eq!(
                c.listen_client_urls,
                ["http://localhost:2379", "unix:///tmp/m.sock"]
            );
            assert_eq!(
                c.experimental_watch_progress_notify_interval,
                std::time::Duration::from_secs(5)
            );
            assert_eq!(
                c.experimental_corrupt_check_time,
                std::time::Duration::from_secs(120)
            );
            assert_eq!(c.cert_file.as_deref(), Some(Path::new("/c.crt")));
            assert_eq!(c.key_file.as_deref(), Some(Path::new("/c.key")));
            assert_eq!(c.trusted_ca_file.as_deref(), Some(Path::new("/ca.crt")));
            assert!(c.client_cert_auth);
            assert_eq!(c.peer_cert_file.as_deref(), Some(Path::new("/p.crt")));
            assert_eq!(c.peer_key_file.as_deref(), Some(Path::new("/p.key")));
            assert!(!c.peer_client_cert_auth);
        }
    }

    #[test]
    fn config_file_refuses_unknown_keys_and_mixing_with_flags_or_variables() {
        let f = yaml_file(
            "name: a\nbogus-key: 1\nclient-transport-security:\n  cert-file: /c\n  colour: red\n",
        );
        let path = f.path().to_str().unwrap();
        let e = err(&["--config-file", path], &[]);
        assert!(
            e.ends_with("unknown keys (no such etcd flag, or one MetaStore does not implement): bogus-key, client-transport-security.colour"),
            "{e}"
        );

        let f = yaml_file("name: a\n");
        let path = f.path().to_str().unwrap();
        let e = err(
            &["--config-file", path, "--name", "b"],
            &[("ETCD_DATA_DIR", "/x"), ("ETCD_SERVICE_PORT", "1")],
        );
        assert!(
            e.ends_with(
                "cannot be combined with other flags or ETCD_* variables (etcd would ignore \
                 them): --name, ETCD_DATA_DIR"
            ),
            "{e}"
        );
        // A bad value names the file and the value.
        let f = yaml_file("snapshot-count: lots\n");
        let e = err(&["--config-file", f.path().to_str().unwrap()], &[]);
        assert!(e.starts_with("config file "), "{e}");
        assert!(e.contains("lots"), "{e}");
        // Not a mapping, several documents, not YAML.
        for text in ["- a\n- b\n", "name: a\n---\nname: b\n", "name: [a\n"] {
            let f = yaml_file(text);
            let e = err(&["--config-file", f.path().to_str().unwrap()], &[]);
            assert!(e.starts_with("config file "), "{text:?}: {e}");
        }
        let e = err(&["--config-file", "/nonexistent/metastore.yml"], &[]);
        assert!(
            e.starts_with("reading config file /nonexistent/metastore.yml"),
            "{e}"
        );
    }
}
