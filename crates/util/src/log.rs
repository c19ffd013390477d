//! Logging setup of the binaries: `tracing` to stderr, filtered by `--log-level`, else
//! `RUST_LOG`, else a default.

use tracing_subscriber::EnvFilter;

/// Installs the stderr subscriber. `level` is an `EnvFilter` directive (`info`,
/// `debug`, `tooltrain_model=trace`); `None` reads `RUST_LOG`, else uses `default`.
pub fn init_logging(level: Option<&str>, default: &str) -> Result<(), String> {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("invalid --log-level `{l}`: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init()
        .map_err(|e| format!("installing the logger: {e}"))
}
