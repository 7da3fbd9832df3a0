-- Arca control-plane schema, version 1.
--
-- Portable to SQLite and PostgreSQL: only TEXT and BIGINT columns (booleans
-- are 0/1, times are Unix microseconds, UTC), no dialect functions, no
-- AUTOINCREMENT. Anything dialect-specific belongs in src/db/dialect.rs.

CREATE TABLE teams (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

-- Only the SHA-256 of a key is kept; the plaintext is shown once.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams (id),
    key_hash TEXT NOT NULL UNIQUE,
    key_mask TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

-- team_id NULL = visible to every team.
CREATE TABLE templates (
    id TEXT PRIMARY KEY,
    alias TEXT UNIQUE,
    team_id TEXT REFERENCES teams (id),
    cpu_count BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_size_mb BIGINT NOT NULL,
    envd_version TEXT NOT NULL,
    ready BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

INSERT INTO templates (id, alias, team_id, cpu_count, memory_mb, disk_size_mb, envd_version, ready, created_at)
VALUES ('base', 'base', NULL, 2, 512, 1024, '0.6.13', 1, 0);

-- state: creating | running | paused. metadata is a JSON object kept for
-- answers; sandbox_metadata holds the same pairs for filtering.
CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams (id),
    template_id TEXT NOT NULL,
    alias TEXT,
    state TEXT NOT NULL,
    metadata TEXT NOT NULL,
    envd_access_token TEXT NOT NULL,
    envd_version TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    end_at BIGINT NOT NULL,
    cpu_count BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_size_mb BIGINT NOT NULL,
    allow_internet_access BIGINT,
    auto_pause BIGINT NOT NULL,
    auto_pause_memory BIGINT NOT NULL,
    auto_resume BIGINT NOT NULL
);

CREATE INDEX sandboxes_team_started ON sandboxes (team_id, started_at, id);

CREATE TABLE sandbox_metadata (
    sandbox_id TEXT NOT NULL REFERENCES sandboxes (id),
    meta_key TEXT NOT NULL,
    meta_value TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, meta_key)
);

CREATE INDEX sandbox_metadata_pair ON sandbox_metadata (meta_key, meta_value);

-- Idempotency-Key of POST /v2/sandboxes; sandbox_id NULL while the create runs.
CREATE TABLE idempotency_keys (
    team_id TEXT NOT NULL REFERENCES teams (id),
    idem_key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    sandbox_id TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (team_id, idem_key)
);
