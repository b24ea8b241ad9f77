-- Webhook deliveries given up (WebhookDeliveryFailed), one row per endpoint and message: the
-- last failure's attempts, error and body, and when it was last sent again
-- (WebhookDeliveryRetried, cleared by a later failure). `seq` is the failure's event.
CREATE TABLE webhook_delivery_failures (
    tenant_id text NOT NULL,
    endpoint_id uuid NOT NULL,
    message_id text NOT NULL,
    attempts integer NOT NULL,
    error text NOT NULL,
    payload jsonb NOT NULL,
    failed_at timestamptz NOT NULL,
    seq bigint NOT NULL,
    retried_at timestamptz,
    PRIMARY KEY (endpoint_id, message_id)
);
-- The newest first, page by page.
CREATE INDEX webhook_delivery_failures_by_endpoint ON webhook_delivery_failures (tenant_id, endpoint_id, seq DESC);
