//! Teams' API keys: making them, checking them, revoking them.
//!
//! A key is `e2b_` followed by 40 lowercase hex characters (160 random bits),
//! the format the reference server hands out and that 2.45.x SDKs check
//! client-side (CONTRACT 1.1). Only its SHA-256 is stored: a copied database
//! file does not give away working keys. A plain hash (no salt, no slow KDF)
//! is enough because the keys are random, not chosen by people.

use chrono::{DateTime, Utc};

use crate::db::Db;
use crate::error::ApiError;
use crate::ids;

/// Prefix of every API key.
const KEY_PREFIX: &str = "e2b_";
/// Random bytes in a key (40 hex characters).
const KEY_RANDOM_BYTES: usize = 20;
/// Name of the team made on the first start.
const DEFAULT_TEAM: &str = "default";

/// One API key as listed for operators; the key itself is never kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Key id (UUID), for [`Api::revoke_key`](crate::Api::revoke_key).
    pub id: String,
    /// Id of the owning team.
    pub team_id: String,
    /// Name of the owning team.
    pub team: String,
    /// Recognizable but useless part of the key: `e2b_1a2b…9f0e`.
    pub mask: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// Whether it was revoked.
    pub revoked: bool,
}

/// A new key: `(plaintext, sha256 hex, mask)`.
fn new_key() -> (String, String, String) {
    let key = format!("{KEY_PREFIX}{}", ids::random_hex(KEY_RANDOM_BYTES));
    let hash = hash_key(&key);
    let mask = format!(
        "{}{}…{}",
        KEY_PREFIX,
        &key[KEY_PREFIX.len()..KEY_PREFIX.len() + 4],
        &key[key.len() - 4..]
    );
    (key, hash, mask)
}

/// What is stored for (and looked up by) a presented key.
pub(crate) fn hash_key(key: &str) -> String {
    ids::sha256_hex(key.as_bytes())
}

pub(crate) async fn ensure_bootstrap(db: &Db) -> Result<Option<String>, ApiError> {
    let team_id = ids::new_uuid();
    let (key, hash, mask) = new_key();
    let key_id = ids::new_uuid();
    let made = db
        .bootstrap(
            (&team_id, DEFAULT_TEAM),
            (&key_id, &hash, &mask),
            Utc::now(),
        )
        .await?;
    if made {
        tracing::info!(team_id = %team_id, key_id = %key_id, "created the default team and its first API key");
    }
    Ok(made.then_some(key))
}

pub(crate) async fn create_team(db: &Db, name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(ApiError::BadRequest("a team name must not be empty".into()));
    }
    let id = ids::new_uuid();
    if !db.insert_team(&id, name, Utc::now()).await? {
        return Err(ApiError::Conflict {
            message: format!("team '{name}' already exists"),
            error_code: None,
        });
    }
    tracing::info!(team_id = %id, team = %name, "created a team");
    Ok(id)
}

pub(crate) async fn create_key(db: &Db, team: &str) -> Result<String, ApiError> {
    let Some(team_id) = db.find_team(team).await? else {
        return Err(ApiError::NotFound(format!("team '{team}' not found")));
    };
    let (key, hash, mask) = new_key();
    let key_id = ids::new_uuid();
    db.insert_key((&key_id, &hash, &mask), &team_id, Utc::now())
        .await?;
    tracing::info!(team_id = %team_id, key_id = %key_id, "created an API key");
    Ok(key)
}

pub(crate) async fn list_keys(db: &Db) -> Result<Vec<KeyInfo>, ApiError> {
    db.list_keys().await
}

pub(crate) async fn revoke_key(db: &Db, id: &str) -> Result<(), ApiError> {
    if db.revoke_key(id, Utc::now()).await? {
        tracing::info!(key_id = %id, "revoked an API key");
        Ok(())
    } else {
        Err(ApiError::NotFound(format!("API key '{id}' not found")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_e2b_format_and_a_mask() {
        let (key, hash, mask) = new_key();
        assert_eq!(key.len(), 44);
        assert!(key.starts_with("e2b_"));
        assert!(
            key[4..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(hash, hash_key(&key));
        assert_eq!(hash.len(), 64);
        assert!(mask.starts_with(&key[..8]) && mask.ends_with(&key[40..]));
        assert_ne!(new_key().0, key);
    }
}
