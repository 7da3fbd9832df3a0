-- Arca control-plane schema, version 2: the template registry.
--
-- Same portable subset as 0001 (TEXT and BIGINT only, booleans 0/1, times
-- in Unix microseconds, no dialect functions). 0001 only ever held the
-- built-in `base` template, so it is carried over explicitly.
--
-- A template has names (unique across teams: a name resolves to exactly
-- one template), builds, and tags that point at ready builds. A sandbox is
-- started from the build a tag points at (`default` when none is named).

-- team_id NULL = built into Arca (visible to every team, like a public one).
CREATE TABLE templates_v2 (
    id TEXT PRIMARY KEY,
    team_id TEXT REFERENCES teams (id),
    public BIGINT NOT NULL,
    -- Reserved for user accounts; API keys have no user, so NULL.
    created_by TEXT,
    build_count BIGINT NOT NULL,
    spawn_count BIGINT NOT NULL,
    last_spawned_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- No NULL literals in INSERT ... SELECT lists (their type is unknown to
-- PostgreSQL there): nullable columns are left out and default to NULL.
INSERT INTO templates_v2 (id, team_id, public, build_count, spawn_count, created_at, updated_at)
SELECT id, team_id, 1, 1, 0, created_at, created_at FROM templates WHERE id = 'base';

-- Builds record their own resources; the old columns move there.
CREATE TABLE template_builds (
    id TEXT PRIMARY KEY,
    template_id TEXT NOT NULL REFERENCES templates_v2 (id),
    -- waiting | building | ready | error
    status TEXT NOT NULL,
    -- JSON {"message": str, "step": str?} once status = error.
    reason TEXT,
    -- JSON array of the tags to point at this build once it is ready.
    tags TEXT NOT NULL,
    cpu_count BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_size_mb BIGINT NOT NULL,
    start_cmd TEXT,
    ready_cmd TEXT,
    -- Empty until the build is ready.
    envd_version TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    -- NULL until the build was started (v2 build start, or a v1 request).
    started_at BIGINT,
    finished_at BIGINT
);

CREATE INDEX template_builds_template ON template_builds (template_id, created_at);

-- The id is arca_proto::build::BASE_BUILD_ID (a unit test checks it).
INSERT INTO template_builds (id, template_id, status, tags, cpu_count, memory_mb, disk_size_mb, envd_version, created_at, updated_at, started_at, finished_at)
SELECT '00000000-0000-4000-8000-000000000000', id, 'ready', '["default"]', cpu_count, memory_mb, disk_size_mb, envd_version, created_at, created_at, created_at, created_at
FROM templates WHERE id = 'base';

DROP TABLE templates;
ALTER TABLE templates_v2 RENAME TO templates;

CREATE TABLE template_names (
    name TEXT PRIMARY KEY,
    template_id TEXT NOT NULL REFERENCES templates (id),
    created_at BIGINT NOT NULL
);

CREATE INDEX template_names_template ON template_names (template_id);

INSERT INTO template_names (name, template_id, created_at) VALUES ('base', 'base', 0);

-- Only ever points at a ready build.
CREATE TABLE template_tags (
    template_id TEXT NOT NULL REFERENCES templates (id),
    tag TEXT NOT NULL,
    build_id TEXT NOT NULL REFERENCES template_builds (id),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (template_id, tag)
);

INSERT INTO template_tags (template_id, tag, build_id, created_at)
VALUES ('base', 'default', '00000000-0000-4000-8000-000000000000', 0);

-- seq counts from 0 per build; logsOffset of the status endpoint indexes it.
CREATE TABLE template_build_logs (
    build_id TEXT NOT NULL REFERENCES template_builds (id),
    seq BIGINT NOT NULL,
    logged_at BIGINT NOT NULL,
    -- debug | info | warn | error
    level TEXT NOT NULL,
    step TEXT,
    message TEXT NOT NULL,
    PRIMARY KEY (build_id, seq)
);

-- Upload links for COPY archives (GET /templates/{id}/files/{hash}). Only
-- the SHA-256 of a link's token is kept. uploaded_at is set once the archive
-- arrived; a team trusts an archive as present only after it uploaded it
-- itself (the files live in one directory shared by every team).
CREATE TABLE template_uploads (
    token_hash TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams (id),
    template_id TEXT NOT NULL,
    files_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    uploaded_at BIGINT
);

CREATE INDEX template_uploads_team_hash ON template_uploads (team_id, files_hash);
