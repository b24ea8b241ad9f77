-- Admission control: why a run or step waits, and a run's dispatch priority.
ALTER TABLE runs ADD COLUMN priority integer NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN wait_reason text;
ALTER TABLE steps ADD COLUMN wait_reason text;
