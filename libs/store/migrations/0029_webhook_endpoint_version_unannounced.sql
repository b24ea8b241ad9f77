-- An endpoint's version changes with every event of its log (0028), a failed delivery's
-- record too, which changes nothing the notifier keeps of it: announce an update only when
-- something besides the version changed, so the notifier does not forget the tenant's
-- endpoints at every failed delivery.
DROP TRIGGER webhook_endpoints_changed ON webhook_endpoints;

CREATE TRIGGER webhook_endpoints_changed
    AFTER INSERT OR DELETE ON webhook_endpoints
    FOR EACH ROW EXECUTE FUNCTION taskmesh_webhook_endpoints_changed();

CREATE TRIGGER webhook_endpoints_updated
    AFTER UPDATE ON webhook_endpoints
    FOR EACH ROW WHEN ((to_jsonb(OLD) - 'version') IS DISTINCT FROM (to_jsonb(NEW) - 'version'))
    EXECUTE FUNCTION taskmesh_webhook_endpoints_changed();
