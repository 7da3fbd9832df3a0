//! Everything that differs between database backends: URL handling, pool
//! set-up and connection pragmas. The rest of the crate speaks portable SQL
//! (`$N` placeholders, TEXT and BIGINT columns) through sqlx's `Any` driver,
//! so adding PostgreSQL (issue 7) is a matter of this module and the `postgres`
//! feature of sqlx.

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor as _};

use crate::error::ApiError;

/// Connections of a file-backed SQLite pool. SQLite serializes writers
/// anyway; a few connections let reads proceed beside a write (WAL).
const SQLITE_MAX_CONNECTIONS: u32 = 4;

/// How long a query waits for a pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// A supported database backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// A SQLite file (or `:memory:`).
    Sqlite,
}

/// Opens a pool for `url`, creating a SQLite file and its directory if
/// missing.
pub(crate) async fn connect(url: &str) -> Result<(AnyPool, Backend), ApiError> {
    sqlx::any::install_default_drivers();
    let Some(rest) = url.strip_prefix("sqlite:") else {
        return Err(ApiError::UnsupportedDatabase(url.to_string()));
    };
    let path = rest.trim_start_matches("//");
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let memory = path.is_empty() || path == ":memory:" || url.contains("mode=memory");
    if !memory {
        if let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|source| ApiError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
    }
    // `mode=rwc` creates the file; an explicit mode in the URL wins.
    let full = if memory || url.contains("mode=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    };
    let opts = AnyConnectOptions::from_str(&full).map_err(|source| ApiError::OpenDb {
        url: url.to_string(),
        source,
    })?;
    // Every in-memory connection would be its own empty database.
    let max = if memory { 1 } else { SQLITE_MAX_CONNECTIONS };
    let pool = AnyPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                if !memory {
                    // WAL lets readers run beside the writer; NORMAL sync is
                    // durable across application crashes, which is what
                    // matters for records a node can reconcile anyway.
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                }
                conn.execute("PRAGMA foreign_keys = ON").await?;
                Ok(())
            })
        })
        .connect_with(opts)
        .await
        .map_err(|source| ApiError::OpenDb {
            url: url.to_string(),
            source,
        })?;
    Ok((pool, Backend::Sqlite))
}

/// Whether `err` is a violated unique or primary-key constraint.
pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.is_unique_violation())
}
