-- A run submitted with `refresh_cache`: its `cache:` steps ran rather than reuse kept outcomes.
ALTER TABLE runs ADD COLUMN refresh_cache boolean NOT NULL DEFAULT false;
