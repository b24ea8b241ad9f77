-- A repository connection may report its runs to the forge as commit statuses: with a token of
-- the forge's API (sealed, like the webhook secret), at its API's URL (none: the public one).
ALTER TABLE repo_connections ADD COLUMN status_token text, ADD COLUMN api_url text;
