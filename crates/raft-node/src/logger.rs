//! raft-rs logs through `slog`; this forwards its records to `tracing` (target `raft`).

use std::fmt::{self, Write as _};

use slog::{o, Drain, Key, OwnedKVList, Record, Serializer, KV};

/// A logger for raft-rs whose records become `tracing` events tagged with `member_id`.
pub(crate) fn raft_logger(member_id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain, o!("member_id" => format!("{member_id:x}")))
}

struct TracingDrain;

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let level = match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::Level::ERROR,
            slog::Level::Warning => tracing::Level::WARN,
            slog::Level::Info => tracing::Level::INFO,
            slog::Level::Debug => tracing::Level::DEBUG,
            slog::Level::Trace => tracing::Level::TRACE,
        };
        if !enabled(level) {
            return Ok(());
        }
        let mut fields = FieldWriter(String::new());
        // Formatting into a String cannot fail, so the results carry no information.
        let _ = record.kv().serialize(record, &mut fields);
        let _ = values.serialize(record, &mut fields);
        let message = record.msg();
        let fields = fields.0;
        match level {
            tracing::Level::ERROR => tracing::error!(target: "raft", "{message}{fields}"),
            tracing::Level::WARN => tracing::warn!(target: "raft", "{message}{fields}"),
            tracing::Level::INFO => tracing::info!(target: "raft", "{message}{fields}"),
            tracing::Level::DEBUG => tracing::debug!(target: "raft", "{message}{fields}"),
            _ => tracing::trace!(target: "raft", "{message}{fields}"),
        }
        Ok(())
    }
}

fn enabled(level: tracing::Level) -> bool {
    match level {
        tracing::Level::ERROR => tracing::enabled!(target: "raft", tracing::Level::ERROR),
        tracing::Level::WARN => tracing::enabled!(target: "raft", tracing::Level::WARN),
        tracing::Level::INFO => tracing::enabled!(target: "raft", tracing::Level::INFO),
        tracing::Level::DEBUG => tracing::enabled!(target: "raft", tracing::Level::DEBUG),
        _ => tracing::enabled!(target: "raft", tracing::Level::TRACE),
    }
}

/// Renders slog key-value pairs as ` key=value`.
struct FieldWriter(String);

impl Serializer for FieldWriter {
    fn emit_arguments(&mut self, key: Key, val: &fmt::Arguments<'_>) -> slog::Result {
        write!(self.0, " {key}={val}").map_err(|_| slog::Error::Other)
    }
}
