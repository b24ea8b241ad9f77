-- A webhook endpoint's and a repository connection's version: the log sequence of the last
-- event on its subject, as `schedules.version` (0027), which their `PATCH` takes in
-- `If-Match`. Rows projected before have none until their next event (or a rebuild).
ALTER TABLE webhook_endpoints ADD COLUMN version bigint;
ALTER TABLE repo_connections ADD COLUMN version bigint;
