-- pg_outbox 0.1.0 -> 0.2.0: delayed delivery, pausing topics, dead-letter retries, replay of
-- retained messages, per-topic routing, wait_for_delivery, richer monitoring.
-- A fresh CREATE EXTENSION runs pg_outbox--0.1.0.sql and then this file, so both paths give the
-- same objects.
\echo Use "ALTER EXTENSION pg_outbox UPDATE" to load this file. \quit

-- Storage -----------------------------------------------------------------------------------

-- A delayed message waits in held_messages until next_attempt_at, without blocking its key.
ALTER TABLE outbox.held_messages ADD COLUMN delayed boolean NOT NULL DEFAULT false;

-- Deliveries per second, decayed over a minute (updated by the worker with each batch).
ALTER TABLE outbox.topics ADD COLUMN delivery_rate double precision NOT NULL DEFAULT 0;

-- Where a topic's messages go, when not to the Kafka topic of the same name on the default
-- cluster. Readable by superusers only: properties may hold credentials.
CREATE TABLE outbox.destinations (
    topic             text PRIMARY KEY,
    kafka_topic       text,
    bootstrap_servers text,
    kafka_properties  text,
    CHECK (kafka_topic IS NOT NULL OR bootstrap_servers IS NOT NULL)
);
REVOKE ALL ON outbox.destinations FROM PUBLIC;
COMMENT ON TABLE outbox.destinations IS
    'Per-topic routing: another Kafka topic name and/or another cluster (bootstrap_servers, with librdkafka properties as in pg_outbox.kafka_properties).';

-- Enqueueing --------------------------------------------------------------------------------

CREATE FUNCTION outbox._wake_on_commit() RETURNS void
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'wake_on_commit_wrapper';

DROP FUNCTION outbox.enqueue_message(text, jsonb, text, jsonb);
DROP FUNCTION outbox.enqueue_message(text, bytea, text, jsonb);

-- The one place that stores a message; both payload types go through it.
CREATE FUNCTION outbox._store_message(topic text, key text, payload bytea, json_payload jsonb,
                                      headers jsonb, deliver_at timestamptz)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    new_id bigint;
BEGIN
    IF deliver_at IS NULL OR deliver_at <= now() THEN
        INSERT INTO outbox.messages (topic, key, payload, json_payload, headers)
            VALUES (topic, key, payload, json_payload, headers)
            RETURNING id INTO new_id;
    ELSE
        INSERT INTO outbox.held_messages (id, topic, key, payload, json_payload, headers, enqueued_at,
                                          next_attempt_at, delayed)
            VALUES (nextval('outbox.message_id_seq'), topic, key, payload, json_payload, headers, now(),
                    deliver_at, true)
            RETURNING id INTO new_id;
    END IF;
    RETURN new_id;
END
$$;

CREATE FUNCTION outbox.enqueue_message(topic text, payload jsonb, key text DEFAULT NULL,
                                       headers jsonb DEFAULT NULL, deliver_after interval DEFAULT NULL,
                                       deliver_at timestamptz DEFAULT NULL)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
BEGIN
    PERFORM outbox._prepare_enqueue(topic, key, headers, octet_length(payload::text));
    RETURN outbox._store_message(topic, key, NULL, payload, headers,
                                 coalesce(deliver_at, now() + deliver_after));
END
$$;

CREATE FUNCTION outbox.enqueue_message(topic text, payload bytea, key text DEFAULT NULL,
                                       headers jsonb DEFAULT NULL, deliver_after interval DEFAULT NULL,
                                       deliver_at timestamptz DEFAULT NULL)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
BEGIN
    PERFORM outbox._prepare_enqueue(topic, key, headers, octet_length(payload));
    RETURN outbox._store_message(topic, key, payload, NULL, headers,
                                 coalesce(deliver_at, now() + deliver_after));
END
$$;

COMMENT ON FUNCTION outbox.enqueue_message(text, jsonb, text, jsonb, interval, timestamptz) IS
    'Queues a JSON message for Kafka in the current transaction; it is delivered only if the transaction commits, not before deliver_at / now() + deliver_after. Returns the message id.';
COMMENT ON FUNCTION outbox.enqueue_message(text, bytea, text, jsonb, interval, timestamptz) IS
    'Queues a binary message for Kafka in the current transaction; it is delivered only if the transaction commits, not before deliver_at / now() + deliver_after. Returns the message id.';

-- Delivery state ----------------------------------------------------------------------------

-- 'pending', 'delivered', 'dead', or NULL for an id that was never committed (or whose storage
-- slot was truncated long after delivery).
CREATE FUNCTION outbox.message_status(message_id bigint) RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN EXISTS (SELECT 1 FROM outbox.dead_letters d WHERE d.id = message_id) THEN 'dead'
        WHEN EXISTS (SELECT 1 FROM outbox.held_messages h WHERE h.id = message_id) THEN 'pending'
        ELSE (SELECT CASE WHEN pg_visible_in_snapshot(m.txid, s.done_snapshot)
                            OR (s.window_snapshot IS NOT NULL
                                AND pg_visible_in_snapshot(m.txid, s.window_snapshot)
                                AND m.id <= s.window_last_id)
                          THEN 'delivered' ELSE 'pending' END
              FROM outbox.messages m, outbox.worker_state s
              WHERE m.id = message_id)
    END
$$;

CREATE FUNCTION outbox.wait_for_delivery(message_id bigint, timeout interval DEFAULT '30 seconds')
    RETURNS boolean
    LANGUAGE c VOLATILE STRICT SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS 'MODULE_PATHNAME', 'wait_for_delivery_wrapper';
COMMENT ON FUNCTION outbox.wait_for_delivery(bigint, interval) IS
    'Blocks (asleep, woken by the worker) until the broker acknowledged the message: true, or false once the timeout passed first. Call it after the enqueuing transaction committed, in READ COMMITTED.';

-- Administration ----------------------------------------------------------------------------

CREATE FUNCTION outbox.pause_topic(topic text) RETURNS void
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO outbox.topics AS t (topic, paused) VALUES (pause_topic.topic, true)
        ON CONFLICT ON CONSTRAINT topics_pkey DO UPDATE SET paused = true;
END
$$;
COMMENT ON FUNCTION outbox.pause_topic(text) IS
    'Stops forwarding a topic: its messages wait (nothing is lost) until outbox.resume_topic.';

CREATE FUNCTION outbox.resume_topic(topic text) RETURNS void
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE outbox.topics t SET paused = false WHERE t.topic = resume_topic.topic;
    PERFORM outbox._wake_on_commit();
END
$$;

-- Puts dead letters back in line (at the end of their key's line), attempts reset.
CREATE FUNCTION outbox._revive(ids bigint[]) RETURNS integer
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
BEGIN
    WITH revived AS (
        DELETE FROM outbox.dead_letters WHERE id = ANY (ids) RETURNING *
    )
    INSERT INTO outbox.held_messages (id, topic, key, payload, json_payload, headers, enqueued_at)
    SELECT id, topic, key, payload, json_payload, headers, enqueued_at FROM revived ORDER BY id;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM outbox._wake_on_commit();
    RETURN n;
END
$$;

CREATE FUNCTION outbox.retry_dead_letter(message_id bigint) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
    RETURN outbox._revive(ARRAY[message_id]) = 1;

CREATE FUNCTION outbox.retry_dead_letters(topic text) RETURNS integer
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
    RETURN outbox._revive(ARRAY(SELECT d.id FROM outbox.dead_letters d WHERE d.topic = retry_dead_letters.topic));

CREATE FUNCTION outbox.purge_dead_letters(topic text DEFAULT NULL, older_than interval DEFAULT NULL)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
BEGIN
    DELETE FROM outbox.dead_letters d
    WHERE (purge_dead_letters.topic IS NULL OR d.topic = purge_dead_letters.topic)
      AND (older_than IS NULL OR d.died_at < now() - older_than);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Sends delivered messages of a topic again, with their original message ids. Only messages
-- still stored can be replayed: set pg_outbox.retention to keep them.
CREATE FUNCTION outbox.replay(topic text, since timestamptz) RETURNS integer
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
BEGIN
    INSERT INTO outbox.held_messages (id, topic, key, payload, json_payload, headers, enqueued_at)
    SELECT m.id, m.topic, m.key, m.payload, m.json_payload, m.headers, m.enqueued_at
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

-- Monitoring --------------------------------------------------------------------------------

DROP VIEW outbox.topic_stats;
CREATE VIEW outbox.topic_stats AS
WITH pending AS (
    SELECT topic, count(*) AS pending, now() - min(enqueued_at) AS oldest_pending_age
    FROM outbox.pending_messages WHERE next_attempt_at IS NULL OR next_attempt_at <= now() OR attempts > 0
    GROUP BY topic
), scheduled AS (
    SELECT topic, count(*) AS scheduled FROM outbox.held_messages
    WHERE delayed AND attempts = 0 AND next_attempt_at > now() GROUP BY topic
), dead AS (
    SELECT topic, count(*) AS dead_letters FROM outbox.dead_letters GROUP BY topic
), topics AS (
    SELECT topic FROM outbox.topics UNION SELECT topic FROM pending
    UNION SELECT topic FROM scheduled UNION SELECT topic FROM dead
)
SELECT n.topic,
       coalesce(p.pending, 0) AS pending,
       p.oldest_pending_age,
       coalesce(s.scheduled, 0) AS scheduled,
       coalesce(t.delivered_total, 0) AS delivered_total,
       coalesce(t.failed_attempts, 0) AS failed_attempts,
       coalesce(d.dead_letters, 0) AS dead_letters,
       t.last_delivered_at,
       round((coalesce(t.delivery_rate, 0)
              * exp(-greatest(extract(epoch FROM now() - t.last_delivered_at), 0) / 60))::numeric, 1)
           AS recent_rate_per_s,
       coalesce(t.paused, false) AS paused
FROM topics n
LEFT JOIN outbox.topics t USING (topic)
LEFT JOIN pending p USING (topic)
LEFT JOIN scheduled s USING (topic)
LEFT JOIN dead d USING (topic);

DROP VIEW outbox.worker_status;
CREATE VIEW outbox.worker_status AS
SELECT w.database, w.pid, w.state, w.broker_state,
       CASE WHEN w.database = current_database()
            THEN (SELECT count(*) FROM outbox.pending_messages) END AS backlog,
       w.in_flight, w.batches, w.messages_delivered,
       w.wakeups_by_commit, w.wakeups_by_poll, w.empty_wakeups, w.last_error, w.last_error_at,
       now() - w.started_at AS uptime, w.started_at
FROM outbox._worker_status() w;

-- The worker's settings as they are now. Change them with ALTER SYSTEM SET ... and
-- SELECT pg_reload_conf(): the worker applies them without a restart (except pg_outbox.database).
CREATE VIEW outbox.settings AS
SELECT name, setting, unit, context, short_desc FROM pg_catalog.pg_settings
WHERE name LIKE 'pg_outbox.%';

-- Fault injection for tests: the worker's producer fails with a fatal idempotence error on its
-- next send (it must recreate the producer and resend from the table). Superusers only.
CREATE FUNCTION outbox._inject_producer_fatal_error() RETURNS boolean
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'inject_producer_fatal_error_wrapper';
REVOKE ALL ON FUNCTION outbox._inject_producer_fatal_error() FROM PUBLIC;

-- Privileges ---------------------------------------------------------------------------------
GRANT EXECUTE ON FUNCTION outbox.enqueue_message(text, jsonb, text, jsonb, interval, timestamptz),
                          outbox.enqueue_message(text, bytea, text, jsonb, interval, timestamptz),
                          outbox.wait_for_delivery(bigint, interval),
                          outbox.message_status(bigint) TO outbox_writer;
-- New functions are executable by PUBLIC by default: take that back, then grant what each role needs.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;
GRANT SELECT ON outbox.pending_messages, outbox.topic_stats, outbox.worker_status, outbox.settings
    TO outbox_reader;
GRANT EXECUTE ON FUNCTION outbox.message_status(bigint) TO outbox_reader;
