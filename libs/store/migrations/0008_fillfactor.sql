-- Room in each page for a row's next version. Most writes to `runs` change only `last_seq` or
-- columns no index covers, and every event of a step rewrites its `steps` row: with free space
-- in the page, Postgres keeps the new version there and touches no index (a HOT update), where
-- a full page would send it elsewhere and add an entry to every index on the table.
ALTER TABLE runs SET (fillfactor = 70);
ALTER TABLE steps SET (fillfactor = 80);
ALTER TABLE step_attempts SET (fillfactor = 80);
