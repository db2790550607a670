//! Logging as etcd's flags set it up: `--log-level` (debug, info, warn, error; etcd's panic and
//! fatal log as error), `--log-format` (`json`, etcd's default, or `console`), `--log-outputs`
//! (`stderr`, `stdout`, `default` for stderr, or file paths, comma-separated) and `--logger`
//! (only `zap`, the structured logger etcd 3.5 keeps).

use std::fs::{File, OpenOptions};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriterExt};

use crate::config::Config;

/// The filter directive for an etcd log level.
fn level(name: &str) -> Result<&'static str> {
    Ok(match name {
        "debug" => "debug",
        "info" => "info",
        "warn" => "warn",
        "error" | "dpanic" | "panic" | "fatal" => "error",
        other => bail!(
            "--log-level {other:?}: expected one of debug, info, warn, error, dpanic, panic, fatal"
        ),
    })
}

/// Where log lines go: every output of `--log-outputs`.
fn outputs(list: &[String]) -> Result<BoxMakeWriter> {
    let mut writer: Option<BoxMakeWriter> = None;
    for output in list.iter().map(|o| o.trim()).filter(|o| !o.is_empty()) {
        let next = match output {
            "stderr" | "default" => BoxMakeWriter::new(std::io::stderr),
            "stdout" => BoxMakeWriter::new(std::io::stdout),
            path => {
                let file: File = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("--log-outputs: opening {path}"))?;
                BoxMakeWriter::new(Mutex::new(file))
            }
        };
        writer = Some(match writer {
            None => next,
            Some(w) => BoxMakeWriter::new(w.and(next)),
        });
    }
    Ok(writer.unwrap_or_else(|| BoxMakeWriter::new(std::io::stderr)))
}

/// Checks the logging flags and installs the global subscriber. `RUST_LOG`, when set, overrides
/// the level with its own directives.
pub fn init(cfg: &Config) -> Result<()> {
    if cfg.logger != "zap" {
        bail!(
            "--logger {:?}: only \"zap\" is supported (etcd 3.5 removed capnslog)",
            cfg.logger
        );
    }
    let filter = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(filter) => filter,
        Err(_) => tracing_subscriber::EnvFilter::new(level(&cfg.log_level)?),
    };
    let writer = outputs(&cfg.log_outputs)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match cfg.log_format.as_str() {
        "json" => builder.json().flatten_event(true).init(),
        // `text` is MetaStore's older name for it.
        "console" | "text" => builder.with_ansi(false).init(),
        other => bail!("--log-format {other:?}: expected json or console"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_levels_map_and_unknown_ones_are_refused() {
        assert_eq!(level("warn").unwrap(), "warn");
        assert_eq!(level("fatal").unwrap(), "error");
        let e = level("verbose").unwrap_err().to_string();
        assert!(e.starts_with("--log-level \"verbose\""), "{e}");
    }

    #[test]
    fn outputs_open_files_and_name_the_one_that_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        let list = [
            "stderr".to_string(),
            path.display().to_string(),
            "stdout".to_string(),
        ];
        let writer = outputs(&list).unwrap();
        {
            use std::io::Write;
            use tracing_subscriber::fmt::MakeWriter;
            writer.make_writer().write_all(b"one line\n").unwrap();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one line\n");
        let e = outputs(&["/nonexistent/dir/m.log".to_string()])
            .err()
            .unwrap()
            .to_string();
        assert_eq!(e, "--log-outputs: opening /nonexistent/dir/m.log");
    }
}
