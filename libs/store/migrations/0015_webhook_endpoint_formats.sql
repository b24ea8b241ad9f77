-- What a webhook endpoint is sent: the event signed per Standard Webhooks, or a Slack
-- incoming webhook's message (WebhookEndpointCreated.format).
ALTER TABLE webhook_endpoints ADD COLUMN format text NOT NULL DEFAULT 'standard_webhooks';
