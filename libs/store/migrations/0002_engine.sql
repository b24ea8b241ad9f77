-- Workflow engine: step outputs, retry times, cancellation.
ALTER TABLE steps ADD COLUMN outputs jsonb NOT NULL DEFAULT '{}';
ALTER TABLE steps ADD COLUMN retry_at timestamptz;
ALTER TABLE step_attempts ADD COLUMN outputs jsonb NOT NULL DEFAULT '{}';
ALTER TABLE runs ADD COLUMN cancel_requested_at timestamptz;
