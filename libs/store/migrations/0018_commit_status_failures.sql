-- A repository connection's last commit status given up (CommitStatusFailed), until one is
-- reported again (CommitStatusRecovered): when, for which run and commit, which state, and why.
ALTER TABLE repo_connections ADD COLUMN status_failure jsonb;
