-- The webhook secret a repository connection's last change replaced, still taken until
-- `previous_secret_until`.
ALTER TABLE repo_connections ADD COLUMN previous_secret text, ADD COLUMN previous_secret_until timestamptz;
