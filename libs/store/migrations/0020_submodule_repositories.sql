-- Repositories at the forge a connection's checkouts may fetch as submodules with its token.
ALTER TABLE repo_connections ADD COLUMN submodule_repositories text[] NOT NULL DEFAULT '{}';
