-- pg_outbox 0.3.0 -> 0.4.0
\echo Use "ALTER EXTENSION pg_outbox UPDATE TO '0.4.0'" to load this file. \quit

-- A JSON payload is stored as the UTF-8 text Kafka receives. enqueue_message renders it once
-- anyway (its size check is on that text); before, the worker rendered the jsonb again for every
-- send, which was a third of its cost per message in a drain. Rows written before this version
-- and delayed messages (the PL/pgSQL path) keep json_payload; the worker reads either. Messages
-- that move to held_messages or dead_letters take their payload back as jsonb, so what users see
-- there does not change.
ALTER TABLE outbox.messages ADD COLUMN json_text bytea;

CREATE OR REPLACE FUNCTION outbox.replay(topic text, since timestamptz) RETURNS integer
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
BEGIN
    INSERT INTO outbox.held_messages (id, topic, key, payload, json_payload, headers, enqueued_at)
    SELECT m.id, m.topic, m.key, m.payload,
           coalesce(m.json_payload, convert_from(m.json_text, 'UTF8')::jsonb), m.headers, m.enqueued_at
    FROM outbox.messages m
    WHERE m.topic = replay.topic AND m.enqueued_at >= since
      AND outbox.message_status(m.id) = 'delivered'
    ORDER BY m.id
    ON CONFLICT (id) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM outbox._wake_on_commit();
    RETURN n;
END
$$;
