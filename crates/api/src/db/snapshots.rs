//! Snapshots (`migrations/0003_snapshots.sql`): templates made from a
//! sandbox's files, and the sandbox each came from.
//!
//! A snapshot's template and builds live in the template registry like any
//! other (so a snapshot id works wherever a template reference does, and
//! `DELETE /templates/{id}` removes it with its row here); this table only
//! marks the template as a snapshot of its team.

use chrono::{DateTime, Utc};
use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::templates::{NameTaken, NewBuild, insert_template};
use super::{Arg, Db, from_micros, micros};
use crate::error::ApiError;

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotRow {
    pub(crate) template_id: String,
    pub(crate) team_id: String,
    /// The sandbox its newest build was copied from.
    pub(crate) sandbox_id: String,
    /// The tag its snapshot id names.
    pub(crate) tag: String,
    pub(crate) created_at: DateTime<Utc>,
    /// The template's names, oldest first.
    pub(crate) names: Vec<String>,
}

/// What `GET /snapshots` asks for: one page of a team's snapshots, newest
/// first.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotFilter {
    pub(crate) team_id: String,
    /// Made from this sandbox.
    pub(crate) sandbox_id: Option<String>,
    /// This template.
    pub(crate) template_id: Option<String>,
    /// Whose template has this tag.
    pub(crate) tag: Option<String>,
    /// `(created_at, template_id)` of the last one seen.
    pub(crate) cursor: Option<(i64, String)>,
    pub(crate) limit: u32,
}

const SNAPSHOT_COLUMNS: &str = "s.template_id, s.team_id, s.sandbox_id, s.tag, s.created_at";

fn snapshot_from_row(r: &AnyRow) -> Result<SnapshotRow, sqlx::Error> {
    Ok(SnapshotRow {
        template_id: r.try_get(0)?,
        team_id: r.try_get(1)?,
        sandbox_id: r.try_get(2)?,
        tag: r.try_get(3)?,
        created_at: from_micros(r.try_get(4)?)?,
        names: Vec::new(),
    })
}

impl Db {
    /// Creates the private template `build.template_id` of `team_id` (named
    /// `name`, if any) with its first build, marked as a snapshot of
    /// `sandbox_id`; `Err(NameTaken)` when the name is used.
    pub(crate) async fn insert_snapshot_template(
        &self,
        team_id: &str,
        name: Option<&str>,
        build: &NewBuild,
        sandbox_id: &str,
        tag: &str,
        now: DateTime<Utc>,
    ) -> Result<Result<(), NameTaken>, ApiError> {
        let mut tx = self.pool.begin().await?;
        let id = build.template_id.as_str();
        if let Err(taken) = insert_template(&mut tx, id, team_id, name, build, now).await? {
            return Ok(Err(taken));
        }
        sqlx::query(
            "INSERT INTO snapshots (template_id, team_id, sandbox_id, tag, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(team_id)
        .bind(sandbox_id)
        .bind(tag)
        .bind(micros(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// Records that the snapshot's newest build, named by `tag`, was made
    /// from `sandbox_id` now.
    pub(crate) async fn snapshot_made(
        &self,
        template_id: &str,
        sandbox_id: &str,
        tag: &str,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        sqlx::query(
            "UPDATE snapshots SET sandbox_id = $2, tag = $3, created_at = $4 \
             WHERE template_id = $1",
        )
        .bind(template_id)
        .bind(sandbox_id)
        .bind(tag)
        .bind(micros(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The snapshot whose template is `template_id`, if it is one.
    pub(crate) async fn snapshot(
        &self,
        template_id: &str,
    ) -> Result<Option<SnapshotRow>, ApiError> {
        let sql = format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots s WHERE s.template_id = $1");
        let row = sqlx::query(&sql)
            .bind(template_id)
            .fetch_optional(&self.pool)
            .await?;
        match row.as_ref().map(snapshot_from_row).transpose()? {
            Some(s) => Ok(Some(self.snapshot_names(s).await?)),
            None => Ok(None),
        }
    }

    async fn snapshot_names(&self, mut s: SnapshotRow) -> Result<SnapshotRow, ApiError> {
        let rows = sqlx::query(
            "SELECT name FROM template_names WHERE template_id = $1 ORDER BY created_at, name",
        )
        .bind(s.template_id.as_str())
        .fetch_all(&self.pool)
        .await?;
        s.names = rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        Ok(s)
    }

    /// One page of a team's snapshots, newest first, and whether more
    /// follow.
    pub(crate) async fn list_snapshots(
        &self,
        f: &SnapshotFilter,
    ) -> Result<(Vec<SnapshotRow>, bool), ApiError> {
        let mut args = vec![Arg::Text(f.team_id.clone())];
        // A snapshot shows once a build of it is ready (tags only ever
        // point at ready builds).
        let mut sql = format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots s WHERE s.team_id = $1 \
             AND EXISTS (SELECT 1 FROM template_tags r WHERE r.template_id = s.template_id)"
        );
        let mut push = |arg: Arg| -> usize {
            args.push(arg);
            args.len()
        };
        if let Some(id) = &f.sandbox_id {
            let n = push(Arg::Text(id.clone()));
            sql.push_str(&format!(" AND s.sandbox_id = ${n}"));
        }
        if let Some(t) = &f.template_id {
            let n = push(Arg::Text(t.clone()));
            sql.push_str(&format!(" AND s.template_id = ${n}"));
        }
        if let Some(tag) = &f.tag {
            let n = push(Arg::Text(tag.clone()));
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM template_tags g WHERE g.template_id = s.template_id \
                 AND g.tag = ${n})"
            ));
        }
        if let Some((t, id)) = &f.cursor {
            let t = push(Arg::Int(*t));
            let i = push(Arg::Text(id.clone()));
            sql.push_str(&format!(
                " AND (s.created_at < ${t} OR (s.created_at = ${t} AND s.template_id < ${i}))"
            ));
        }
        // One more than asked tells whether another page exists.
        let n = push(Arg::Int(i64::from(f.limit) + 1));
        sql.push_str(&format!(
            " ORDER BY s.created_at DESC, s.template_id DESC LIMIT ${n}"
        ));
        let mut q = sqlx::query(&sql);
        for a in args {
            q = match a {
                Arg::Text(s) => q.bind(s),
                Arg::Int(i) => q.bind(i),
            };
        }
        let rows = q.fetch_all(&self.pool).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(self.snapshot_names(snapshot_from_row(r)?).await?);
        }
        let more = out.len() > usize::try_from(f.limit).unwrap_or(usize::MAX);
        if more {
            out.pop();
        }
        Ok((out, more))
    }
}
