//! `metastore snapshot status FILE`: check and describe a file written by `etcdctl snapshot save`
//! against MetaStore (the format is in ARCHITECTURE.md), like `etcdutl snapshot status`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

/// Offline snapshot file commands.
#[derive(Parser)]
#[command(name = "metastore snapshot")]
enum SnapshotCommand {
    /// Verify a snapshot file's SHA-256 and print its hash, revision, total keys and total size.
    Status {
        /// The file `etcdctl snapshot save` wrote.
        file: PathBuf,
        /// Output format: simple or json.
        #[arg(short = 'w', long = "write-out", default_value = "simple")]
        write_out: String,
    },
}

/// Run `metastore snapshot <args>`.
pub fn run(args: &[String]) -> Result<()> {
    let command = SnapshotCommand::parse_from(
        std::iter::once("metastore snapshot".to_string()).chain(args.iter().cloned()),
    );
    match command {
        SnapshotCommand::Status { file, write_out } => {
            let st = metastore_maintenance_api::snapshot::status(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            match write_out.as_str() {
                "json" => println!(
                    "{{\"hash\":{},\"revision\":{},\"totalKey\":{},\"totalSize\":{}}}",
                    st.hash, st.revision, st.total_keys, st.total_size_bytes
                ),
                "simple" => println!(
                    "{:x}, {}, {}, {} B",
                    st.hash, st.revision, st.total_keys, st.total_size_bytes
                ),
                other => anyhow::bail!("unknown --write-out {other:?}: use simple or json"),
            }
            Ok(())
        }
    }
}
