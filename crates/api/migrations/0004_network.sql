-- Arca control-plane schema, version 4: network settings of sandboxes
-- (CONTRACT 2.6, ADR 0005).
--
-- Same portable subset as 0001 to 0003 (TEXT and BIGINT only, no dialect
-- functions).

-- network: JSON object of the sandbox's effective settings, only the keys
-- that are set: allowOut, denyOut, dnsServers (egress, replaced by
-- PUT /sandboxes/{id}/network), allowPublicTraffic, maskRequestHost (fixed
-- at create). NULL: none were given (sandboxes made before this migration
-- too), which means no restriction.
ALTER TABLE sandboxes ADD COLUMN network TEXT;

-- The token user ports require in e2b-traffic-access-token
-- (allowPublicTraffic: false); NULL: public.
ALTER TABLE sandboxes ADD COLUMN traffic_access_token TEXT;
