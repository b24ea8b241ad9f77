-- A repository connection may read the workflow its pushes run from a file in the repository,
-- at each pushed commit, instead of holding one.
ALTER TABLE repo_connections ALTER COLUMN workflow DROP NOT NULL, ADD COLUMN pipeline_file text;
