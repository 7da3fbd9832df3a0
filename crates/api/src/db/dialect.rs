//! Everything that differs between database backends: URL handling, pool
//! set-up and connection settings. The rest of the crate speaks portable SQL
//! (`$N` placeholders, TEXT and BIGINT columns) through sqlx's `Any` driver.
//!
//! # Backends
//!
//! | URL | backend | pool |
//! |---|---|---|
//! | `sqlite:<path>` (`sqlite://<path>`, `sqlite::memory:`) | a SQLite file, made with its directory if missing | 4 connections (1 in memory), WAL |
//! | `postgres://…` or `postgresql://…` | PostgreSQL (tested with 15); the database must exist | 16 connections |
//!
//! SQLite is the embedded default of `arca up`; PostgreSQL is the store a
//! cluster's api replicas share (issue 7).
//!
//! # What differs, and how the SQL copes
//!
//! The migrations and queries are written once, for both; these are the
//! differences they are written around:
//!
//! - **Types.** Only TEXT and BIGINT columns (booleans 0/1, times in Unix
//!   microseconds). A PostgreSQL `INTEGER` or a bare literal such as
//!   `SELECT 1` is 32-bit (it still decodes into `i64`); `SUM` over BIGINT
//!   is NUMERIC there, which the `Any` driver cannot decode, so aggregates
//!   other than `COUNT` are wrapped in `CAST(.. AS BIGINT)`. A parameter is
//!   sent typed (`i64` as int8, `&str` as text): PostgreSQL does not coerce
//!   text to a number the way SQLite does, so bind what the column holds.
//!   A NULL literal in an `INSERT .. SELECT` list has no type on PostgreSQL:
//!   leave the column out instead.
//! - **Syntax.** No `INSERT OR IGNORE/REPLACE` (use `ON CONFLICT`, which
//!   both have, or catch [`is_unique_violation`]), no `LIMIT -1`, no
//!   `IFNULL` (`COALESCE`), no `PRAGMA` outside this module, no
//!   `AUTOINCREMENT`/`SERIAL`. `RETURNING` works on both (SQLite 3.35+).
//! - **Errors inside a transaction.** PostgreSQL refuses every further
//!   statement of a transaction after one failed, SQLite carries on. A
//!   caught constraint violation must therefore end its transaction (as
//!   [`is_unique_violation`]'s callers do: they drop it).
//! - **Concurrency.** SQLite runs one writer at a time; PostgreSQL runs
//!   transactions side by side at READ COMMITTED, so a read followed by a
//!   write in one transaction can interleave with another api replica.
//!   Decisions that must be unique across replicas rest on a unique
//!   constraint (the first team's name, an idempotency key, a template
//!   name), not on the read; a row that is replaced is written with
//!   `INSERT .. ON CONFLICT .. DO UPDATE`, not deleted and inserted (two
//!   transactions would both delete nothing, and the second insert would
//!   fail: see `templates::point_tag`). Migrations take PostgreSQL's
//!   advisory lock (sqlx does), so replicas starting together apply each
//!   one once.
//! - **Text order.** SQLite compares bytes; PostgreSQL uses the database's
//!   collation. Listings and their cursors use the same comparison, so
//!   pages are consistent either way; a `C` collation (`CREATE DATABASE ..
//!   LC_COLLATE 'C'`, or `initdb --locale=C` as `scripts/pg.sh` does) gives
//!   exactly SQLite's order.
//! - **Set-up.** SQLite gets WAL, `synchronous = NORMAL` and foreign keys
//!   turned on per connection; PostgreSQL needs nothing (foreign keys are
//!   always enforced). The migrations (`migrations/`) run unchanged on both:
//!   none needs a per-backend variant so far. Should one ever need one, the
//!   variant is chosen here by [`Backend`], and the SQLite text must stay as
//!   it is (applied migrations are checksummed).

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor as _};

use crate::error::ApiError;

/// Connections of a file-backed SQLite pool. SQLite serializes writers
/// anyway; a few connections let reads proceed beside a write (WAL).
const SQLITE_MAX_CONNECTIONS: u32 = 4;

/// Connections of a PostgreSQL pool, per api process. The server's default
/// `max_connections` (100) leaves room for a handful of replicas.
const POSTGRES_MAX_CONNECTIONS: u32 = 16;

/// How long a query waits for a pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// A supported database backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// A SQLite file (or `:memory:`).
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

impl Backend {
    /// The backend a URL names, by its scheme.
    pub(crate) fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

/// Opens a pool for `url`: `sqlite:<path>` (creating the file and its
/// directory if missing), `postgres://…` or `postgresql://…`.
pub(crate) async fn connect(url: &str) -> Result<(AnyPool, Backend), ApiError> {
    sqlx::any::install_default_drivers();
    match Backend::of_url(url) {
        Some(Backend::Sqlite) => connect_sqlite(url).await.map(|p| (p, Backend::Sqlite)),
        Some(Backend::Postgres) => connect_postgres(url).await.map(|p| (p, Backend::Postgres)),
        None => Err(ApiError::UnsupportedDatabase(redact(url))),
    }
}

async fn connect_sqlite(url: &str) -> Result<AnyPool, ApiError> {
    let rest = url.strip_prefix("sqlite:").unwrap_or(url);
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
    AnyPoolOptions::new()
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
        })
}

async fn connect_postgres(url: &str) -> Result<AnyPool, ApiError> {
    let open_error = |source| ApiError::OpenDb {
        url: redact(url),
        source,
    };
    let opts = AnyConnectOptions::from_str(url).map_err(open_error)?;
    // Connects once now, so a wrong URL or an unreachable server fails the
    // start rather than the first request.
    AnyPoolOptions::new()
        .max_connections(POSTGRES_MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(opts)
        .await
        .map_err(open_error)
}

/// `url` with its password (if any) replaced by `***`, for messages and
/// logs: a PostgreSQL URL may carry one.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The authority ends at the first '/', '?' or '#'; its userinfo at the
    // last '@' before that.
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
        None => url.to_string(),
    }
}

/// Whether `err` is a violated unique or primary-key constraint.
pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.is_unique_violation())
}

#[cfg(test)]
#[path = "test_db.rs"]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::testing::{TestDb, on_both_backends, with_database};
    use super::*;
    use crate::db::Db;

    #[test]
    fn backends_are_chosen_by_scheme() {
        assert_eq!(Backend::of_url("sqlite:a.db"), Some(Backend::Sqlite));
        assert_eq!(Backend::of_url("sqlite::memory:"), Some(Backend::Sqlite));
        assert_eq!(
            Backend::of_url("postgres://u@h/db"),
            Some(Backend::Postgres)
        );
        assert_eq!(
            Backend::of_url("postgresql://u@h:5433/db?sslmode=disable"),
            Some(Backend::Postgres)
        );
        for url in ["mysql://u@h/db", "postgres:db", "file:a.db", "", "a.db"] {
            assert_eq!(Backend::of_url(url), None, "{url}");
        }
    }

    #[tokio::test]
    async fn other_urls_are_refused_naming_the_forms_that_work() {
        for url in ["mysql://u:pw@h/db", "arca.db", "postgres:/db"] {
            let err = connect(url).await.unwrap_err();
            assert!(
                matches!(&err, ApiError::UnsupportedDatabase(u) if !u.contains("pw")),
                "{url}: {err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains("sqlite:"), "{msg}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://arca:s3cr@t@db.example:5432/arca?sslmode=require"),
            "postgres://arca:***@db.example:5432/arca?sslmode=require"
        );
        assert_eq!(
            redact("postgresql://arca@127.0.0.1/arca"),
            "postgresql://arca@127.0.0.1/arca"
        );
        assert_eq!(redact("postgres://h/db?user=a"), "postgres://h/db?user=a");
        assert_eq!(redact("sqlite:/var/lib/arca.db"), "sqlite:/var/lib/arca.db");
    }

    #[tokio::test]
    async fn a_failed_postgres_open_does_not_show_the_password() {
        // A "server" that hangs up at once. (A refused connection would be
        // retried for ACQUIRE_TIMEOUT: the server may be starting.)
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                drop(conn);
            }
        });
        let err = Db::open(&format!("postgres://arca:hunter2@{addr}/arca"))
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::OpenDb { .. }), "{err:?}");
        let shown = format!("{err:?} {err}");
        assert!(
            !shown.contains("hunter2") && shown.contains("arca:***@"),
            "{shown}"
        );
    }

    /// A connection gets the backend its URL names, and the pool works.
    async fn connect_reports_the_backend(db: TestDb) {
        let (pool, backend) = connect(&db.url).await.unwrap();
        assert_eq!(backend == Backend::Postgres, db.is_postgres());
        let one: i64 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(one, 1);
    }
    on_both_backends!(connect_reports_the_backend);

    /// Each test gets a database of its own (the test helper's promise).
    async fn test_databases_are_separate(db: TestDb) {
        let other = if db.is_postgres() {
            TestDb::postgres().await.unwrap()
        } else {
            TestDb::sqlite()
        };
        assert_ne!(db.url, other.url);
        let a = Db::open(&db.url).await.unwrap();
        let b = Db::open(&other.url).await.unwrap();
        // Opening made the SQLite file, directory and all.
        for d in [&db, &other] {
            assert_eq!(
                d.sqlite_path().is_some_and(|p| p.is_file()),
                !d.is_postgres()
            );
        }
        let now = chrono::Utc::now();
        assert!(a.insert_team("t1", "one", now).await.unwrap());
        assert_eq!(a.find_team("one").await.unwrap().as_deref(), Some("t1"));
        assert_eq!(b.find_team("one").await.unwrap(), None);
        assert!(b.insert_team("t1", "one", now).await.unwrap());
    }
    on_both_backends!(test_databases_are_separate);

    #[test]
    fn test_database_urls_name_the_new_database() {
        assert_eq!(
            with_database("postgres://arca@127.0.0.1:5432/arca", "t1"),
            "postgres://arca@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database("postgresql://a:b@h/arca?sslmode=disable", "t1"),
            "postgresql://a:b@h/t1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "t1"), "postgres://h:1/t1");
    }

    #[tokio::test]
    async fn postgres_also_accepts_the_postgresql_scheme() {
        let Some(db) = TestDb::postgres().await else {
            return;
        };
        let url = db.url.replacen("postgres://", "postgresql://", 1);
        assert!(url.starts_with("postgresql://"), "{url}");
        let opened = Db::open(&url).await.unwrap();
        assert!(opened.template_by_name("base").await.unwrap().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_replicas_migrating_one_database_at_once_all_succeed() {
        // Cluster mode starts several api processes on one PostgreSQL
        // database; sqlx's advisory lock serializes their migrations.
        let Some(db) = TestDb::postgres().await else {
            return;
        };
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let url = db.url.clone();
                tokio::spawn(async move { Db::open(&url).await })
            })
            .collect();
        for open in opens {
            let opened = open.await.unwrap().unwrap();
            assert!(opened.template_by_name("base").await.unwrap().is_some());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_replicas_bootstrapping_at_once_make_one_team() {
        let Some(db) = TestDb::postgres().await else {
            return;
        };
        let a = Db::open(&db.url).await.unwrap();
        let b = Db::open(&db.url).await.unwrap();
        let now = chrono::Utc::now();
        let (ra, rb) = tokio::join!(
            a.bootstrap(("ta", "default"), ("ka", "ha", "m"), now),
            b.bootstrap(("tb", "default"), ("kb", "hb", "m"), now),
        );
        assert_eq!([ra.unwrap(), rb.unwrap()].iter().filter(|x| **x).count(), 1);
        assert_eq!(a.list_keys().await.unwrap().len(), 1);
    }
}
