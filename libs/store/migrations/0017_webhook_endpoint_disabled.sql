-- A webhook endpoint disabled after its deliveries failed for too long
-- (WebhookEndpointDisabled), until it is enabled again (WebhookEndpointEnabled).
ALTER TABLE webhook_endpoints ADD COLUMN disabled_at timestamptz, ADD COLUMN disabled_reason text;
