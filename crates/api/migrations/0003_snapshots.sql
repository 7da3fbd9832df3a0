-- Arca control-plane schema, version 3: snapshots and the build a sandbox
-- started from.
--
-- Same portable subset as 0001 and 0002 (TEXT and BIGINT only, booleans
-- 0/1, times in Unix microseconds, no dialect functions).

-- The template build a sandbox was started from (forks and snapshots copy
-- it). NULL for sandboxes started before this migration.
ALTER TABLE sandboxes ADD COLUMN build_id TEXT;

-- A snapshot is a template of its team whose builds are copies of a
-- sandbox's files (POST /sandboxes/{id}/snapshots); this row says which
-- sandbox it came from. tag is the tag its snapshot id names. Deleted with
-- its template.
CREATE TABLE snapshots (
    template_id TEXT PRIMARY KEY REFERENCES templates (id),
    team_id TEXT NOT NULL REFERENCES teams (id),
    sandbox_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE INDEX snapshots_team_created ON snapshots (team_id, created_at, template_id);
CREATE INDEX snapshots_sandbox ON snapshots (sandbox_id);
