-- A repository connection may start runs for tag pushes too (tag patterns), and only for
-- branch pushes that change files matching its path patterns.
ALTER TABLE repo_connections ADD COLUMN tags text[] NOT NULL DEFAULT '{}', ADD COLUMN paths text[] NOT NULL DEFAULT '{}';
