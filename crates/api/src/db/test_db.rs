//! Fresh databases for tests, on either backend, and
//! [`on_both_backends!`] to run one test body on each.
//!
//! Test-only. The unit tests reach it as `db::dialect::testing`, the
//! integration tests include this same file from `tests/common` (through
//! `#[path]`), so it names nothing of the crate.
//!
//! PostgreSQL tests need a server: `ARCA_TEST_PG_URL` names a database and a
//! role allowed to create databases (`scripts/pg.sh start DIR` starts a
//! throw-away server and prints such a URL; `scripts/test.sh` does that and
//! sets the variable). Each test gets a database of its own, made for it and
//! dropped after it, so tests run in parallel. Without the variable the
//! PostgreSQL variants say so on stderr and pass; with it, a server that
//! cannot be reached fails them.

use sqlx::{Connection as _, Executor as _, PgConnection};

/// The variable naming the PostgreSQL server tests use.
pub(crate) const PG_URL_ENV: &str = "ARCA_TEST_PG_URL";

/// A database that exists for one test; its URL is for `Db::open`/`Api::open`.
#[derive(Debug)]
pub(crate) struct TestDb {
    /// Where the database is.
    pub(crate) url: String,
    owned: Owned,
}

#[derive(Debug)]
enum Owned {
    /// The directory holding the file; removed on drop.
    Sqlite(tempfile::TempDir),
    /// A database made through `admin_url`; dropped on drop.
    Postgres { admin_url: String, name: String },
}

impl TestDb {
    /// A SQLite file in a new temporary directory (in a subdirectory that
    /// does not exist yet, which opening creates).
    pub(crate) fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        TestDb {
            url: format!("sqlite:{}/db/arca.db", dir.path().display()),
            owned: Owned::Sqlite(dir),
        }
    }

    /// A new, empty PostgreSQL database on the server `ARCA_TEST_PG_URL`
    /// names; `None` (after saying why on stderr) when it is not set.
    ///
    /// # Panics
    ///
    /// When the variable is set but the database cannot be made.
    pub(crate) async fn postgres() -> Option<TestDb> {
        let admin_url = match std::env::var(PG_URL_ENV) {
            Ok(url) if !url.is_empty() => url,
            _ => {
                eprintln!(
                    "skipped: {PG_URL_ENV} is not set, so this PostgreSQL test did not run \
                     (`scripts/pg.sh start DIR` starts a server and prints its URL)"
                );
                return None;
            }
        };
        let name = format!("arca_t_{:016x}", rand::random::<u64>());
        let mut conn = PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {PG_URL_ENV}={admin_url}: {e}"));
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|e| panic!("creating database {name} on {admin_url}: {e}"));
        conn.close().await.ok();
        Some(TestDb {
            url: with_database(&admin_url, &name),
            owned: Owned::Postgres { admin_url, name },
        })
    }

    /// Whether this is a PostgreSQL database.
    pub(crate) fn is_postgres(&self) -> bool {
        matches!(self.owned, Owned::Postgres { .. })
    }

    /// The SQLite file, for tests that look at it.
    pub(crate) fn sqlite_path(&self) -> Option<std::path::PathBuf> {
        match &self.owned {
            Owned::Sqlite(dir) => Some(dir.path().join("db/arca.db")),
            Owned::Postgres { .. } => None,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Owned::Postgres { admin_url, name } = &self.owned else {
            return;
        };
        let (admin_url, name) = (admin_url.clone(), name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on:
        // a thread of its own with a runtime of its own does the work.
        let dropped = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&admin_url).await?;
                // FORCE: the test's pools may still hold connections.
                conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await?;
                conn.close().await
            })
            .map_err(|e| format!("dropping test database {name}: {e}"))
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            // The server is a throw-away one; a leftover database is only
            // clutter, not worth failing a test for.
            Ok(Err(e)) => eprintln!("warning: {e}"),
            Err(_) => eprintln!("warning: dropping a test database panicked"),
        }
    }
}

/// `url` (a PostgreSQL URL) pointing at database `name` instead.
pub(crate) fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{server}/{name}?{q}"),
        None => format!("{server}/{name}"),
    }
}

/// For each named `async fn name(db: TestDb)`, defines a module `name`
/// with two tests, `sqlite` and `postgres`, that run it on a fresh
/// [`TestDb`] of that backend (`TestDb` must be in scope there).
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test]
            async fn sqlite() {
                super::$name(TestDb::sqlite()).await;
            }

            #[tokio::test]
            async fn postgres() {
                if let Some(db) = TestDb::postgres().await {
                    super::$name(db).await;
                }
            }
        }
    )+};
}
pub(crate) use on_both_backends;
