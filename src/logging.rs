//! Logging: `tracing` everywhere, with raft-rs's `slog` output bridged into it.
//!
//! raft-rs logs through `slog`; [`raft_logger`] gives it a root logger whose drain re-emits
//! every record as a `tracing` event under the `raft` target, so one filter
//! (`log.level`, e.g. `info,raft=warn`) and one output cover both.
//!
//! Invariants:
//! - every raft-rs record becomes one `tracing` event under the `raft` target at the same
//!   level (critical as error); its text is formatted only if a subscriber records it;
//! - [`init`] never panics and never replaces an installed subscriber (a second call keeps
//!   the first); a filter that does not parse or a file that cannot be opened is an error;
//! - a log file is opened for appending, never truncated.

use std::fmt::Write as _;
use std::path::Path;

use slog::{Drain, OwnedKVList, Record, KV};

struct TracingDrain;

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

/// A record's message and key-values, formatted only if a `tracing` subscriber records the
/// event: raft-rs logs at debug level on hot paths, which builds with debug assertions (the
/// tests, the local cluster) do not compile out.
struct Text<'a, 'b> {
    record: &'a Record<'b>,
    values: &'a OwnedKVList,
}

impl std::fmt::Display for Text<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kv = KvText(String::new());
        let _ = self.record.kv().serialize(self.record, &mut kv);
        let _ = self.values.serialize(self.record, &mut kv);
        write!(f, "{}{}", self.record.msg(), kv.0)
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let text = Text { record, values };
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{text}"),
            slog::Level::Warning => tracing::warn!(target: "raft", "{text}"),
            slog::Level::Info => tracing::info!(target: "raft", "{text}"),
            slog::Level::Debug => tracing::debug!(target: "raft", "{text}"),
            slog::Level::Trace => tracing::trace!(target: "raft", "{text}"),
        }
        Ok(())
    }
}

/// The root logger handed to raft-rs; peers derive per-region children from it.
pub fn raft_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!())
}

/// Installs the global `tracing` subscriber: `filter` as in `log.level`, to `file` or stderr.
/// Returns an error message if the file cannot be opened or the filter does not parse.
pub fn init(filter: &str, file: &Path) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("log.level {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = if file.as_os_str().is_empty() {
        builder.with_writer(std::io::stderr).try_init()
    } else {
        if let Some(parent) = file.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .map_err(|e| format!("log.file {}: {e}", file.display()))?;
        builder
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(f))
            .try_init()
    };
    // A second init (tests starting several nodes in one process) keeps the first subscriber.
    let _ = result;
    Ok(())
}
