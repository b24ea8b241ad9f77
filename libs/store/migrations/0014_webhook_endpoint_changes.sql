-- Announce each change to a tenant's webhook endpoints (payload: the tenant; `*` when the
-- table is emptied), so the notifier can keep each tenant's endpoints in memory between
-- runs' ends rather than read them for every run (see taskmesh_store::follow_invalidations).
-- Postgres delivers the announcement when the writing transaction commits.
CREATE FUNCTION taskmesh_webhook_endpoints_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('taskmesh_webhook_endpoints', '*');
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('taskmesh_webhook_endpoints', OLD.tenant_id);
    ELSE
        PERFORM pg_notify('taskmesh_webhook_endpoints', NEW.tenant_id);
        IF TG_OP = 'UPDATE' AND OLD.tenant_id <> NEW.tenant_id THEN
            PERFORM pg_notify('taskmesh_webhook_endpoints', OLD.tenant_id);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER webhook_endpoints_changed
    AFTER INSERT OR UPDATE OR DELETE ON webhook_endpoints
    FOR EACH ROW EXECUTE FUNCTION taskmesh_webhook_endpoints_changed();

CREATE TRIGGER webhook_endpoints_emptied
    AFTER TRUNCATE ON webhook_endpoints
    FOR EACH STATEMENT EXECUTE FUNCTION taskmesh_webhook_endpoints_changed();
