-- Cluster mode (issue 7, ADR 0006): nodes, where each sandbox runs, and
-- which template builds each node holds. Portable as 0001 says.

-- Every sandbox made before this migration ran on the one in-process node
-- of `arca up`, which is called `local`.
ALTER TABLE sandboxes ADD COLUMN node_id TEXT NOT NULL DEFAULT 'local';
CREATE INDEX sandboxes_by_node ON sandboxes (node_id);

-- One row per node that ever registered. `status` is what the node or an
-- operator said (ready, draining); `lost` is derived from `last_seen`.
-- capacity and load are JSON (arca_proto::cluster::NodeCapacity, NodeLoad).
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    rpc_url TEXT NOT NULL,
    edge_addr TEXT NOT NULL,
    status TEXT NOT NULL,
    capacity TEXT NOT NULL,
    load TEXT NOT NULL,
    runtimes TEXT NOT NULL,
    version TEXT NOT NULL,
    registered_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL
);

CREATE TABLE node_builds (
    node_id TEXT NOT NULL,
    template_id TEXT NOT NULL,
    build_id TEXT NOT NULL,
    PRIMARY KEY (node_id, template_id, build_id)
);
