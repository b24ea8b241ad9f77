-- A webhook endpoint's signing secret before its last rotation, which signs deliveries too
-- until `previous_until`.
ALTER TABLE webhook_endpoints ADD COLUMN previous_secret text, ADD COLUMN previous_until timestamptz;
