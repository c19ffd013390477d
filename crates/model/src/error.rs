//! The crate's error type: every failure names the file (or input) and the problem.

use std::path::{Path, PathBuf};

/// Errors of the model crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A file exists but its content is malformed or inconsistent.
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    /// A configuration value or architecture is not supported.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A caller passed an invalid argument (shapes, ids, options).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A chat-template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// A tokenizer failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A tensor operation failed (shape mismatch, device error, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of the model crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            err: source,
        }
    }
    pub(crate) fn bad_file(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        Error::BadFile {
            path: path.as_ref().to_path_buf(),
            msg: msg.to_string(),
        }
    }
}

/// Early-return with [`Error::Invalid`].
macro_rules! invalid {
    ($($arg:tt)*) => { return Err($crate::error::Error::Invalid(format!($($arg)*))) };
}
pub(crate) use invalid;

/// Writes `bytes` to `path` atomically ([`tooltrain_util::write_atomic`]), with the
/// path in the error.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    tooltrain_util::write_atomic(path, bytes).map_err(|e| Error::io(path, e))
}
