-- A schedule's version: the log sequence of its last event, the strong ETag of
-- `GET /v1/schedules/{id}` that `PATCH` takes in `If-Match`. Rows projected before this
-- migration have none until their next event (or a rebuild of the read models).
ALTER TABLE schedules ADD COLUMN version bigint;
