-- pg_outbox 0.1.0
\echo Use "CREATE EXTENSION pg_outbox" to load this file. \quit

-- Storage -----------------------------------------------------------------------------------
--
-- Fresh messages go to outbox.messages, a table partitioned into rotation slots. Rows there are
-- only ever inserted, never updated or deleted: the worker tracks what it has delivered with a
-- snapshot watermark (outbox.worker_state), and empties a whole slot with TRUNCATE once every row
-- in it is delivered and no transaction can still write into it (PgQ's table rotation). That keeps
-- the hot path free of dead tuples even while another session pins the xmin horizon.
--
-- The watermark is transaction visibility, not an id: done_snapshot says which transactions'
-- messages are settled. A transaction that enqueued early and commits late is simply not visible
-- in it yet, so it cannot be skipped (no "outbox gap").
--
-- Messages that must wait (a retry after the broker refused them, a paused topic, later messages
-- of a key that has one waiting) move to outbox.held_messages, a small ordinary table; after
-- pg_outbox.max_attempts they move to outbox.dead_letters.

CREATE SEQUENCE outbox.message_id_seq;

CREATE FUNCTION outbox._current_slot() RETURNS smallint
    LANGUAGE c VOLATILE PARALLEL SAFE AS 'MODULE_PATHNAME', 'current_slot_wrapper';

CREATE TABLE outbox.messages (
    id           bigint      NOT NULL DEFAULT nextval('outbox.message_id_seq'),
    txid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    slot         smallint    NOT NULL DEFAULT outbox._current_slot(),
    topic        text        NOT NULL,
    key          text,
    payload      bytea,
    json_payload jsonb,
    headers      jsonb,
    enqueued_at  timestamptz NOT NULL DEFAULT now()
) PARTITION BY LIST (slot);
CREATE TABLE outbox.messages_0 PARTITION OF outbox.messages FOR VALUES IN (0);
CREATE TABLE outbox.messages_1 PARTITION OF outbox.messages FOR VALUES IN (1);
CREATE TABLE outbox.messages_2 PARTITION OF outbox.messages FOR VALUES IN (2);
CREATE TABLE outbox.messages_3 PARTITION OF outbox.messages FOR VALUES IN (3);
CREATE INDEX messages_id_idx ON outbox.messages (id);
CREATE INDEX messages_txid_idx ON outbox.messages (txid);

CREATE TABLE outbox.worker_state (
    singleton        boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    -- Every message of a transaction visible in this snapshot is settled (delivered or held).
    -- '1:1:' sees no transaction at all: nothing is settled yet.
    done_snapshot    pg_snapshot NOT NULL DEFAULT '1:1:',
    -- The window being forwarded: transactions visible here but not in done_snapshot, sent in id
    -- order; window_last_id is the last id of the window already settled.
    window_snapshot  pg_snapshot,
    window_last_id   bigint,
    current_slot     smallint    NOT NULL DEFAULT 0,
    slot_switched_at timestamptz NOT NULL DEFAULT now(),
    delivered_total  bigint      NOT NULL DEFAULT 0
);
INSERT INTO outbox.worker_state DEFAULT VALUES;

CREATE TABLE outbox.topics (
    topic             text        PRIMARY KEY,
    paused            boolean     NOT NULL DEFAULT false,
    delivered_total   bigint      NOT NULL DEFAULT 0,
    failed_attempts   bigint      NOT NULL DEFAULT 0,
    last_delivered_at timestamptz
);

CREATE TABLE outbox.held_messages (
    seq             bigserial   PRIMARY KEY,
    id              bigint      NOT NULL UNIQUE,
    topic           text        NOT NULL,
    key             text,
    payload         bytea,
    json_payload    jsonb,
    headers         jsonb,
    enqueued_at     timestamptz NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    last_error_at   timestamptz
);
CREATE INDEX held_messages_key_idx ON outbox.held_messages (topic, key, seq);

CREATE TABLE outbox.dead_letters (
    id            bigint      PRIMARY KEY,
    topic         text        NOT NULL,
    key           text,
    payload       bytea,
    json_payload  jsonb,
    headers       jsonb,
    enqueued_at   timestamptz NOT NULL,
    attempts      integer     NOT NULL,
    last_error    text,
    died_at       timestamptz NOT NULL DEFAULT now()
);

-- Enqueueing --------------------------------------------------------------------------------

-- Validates a message (raising an error with a SQLSTATE on bad input) and arranges for the
-- worker's latch to be set when the calling transaction commits.
CREATE FUNCTION outbox._prepare_enqueue(topic text, key text, headers jsonb, payload_bytes integer)
    RETURNS void
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'prepare_enqueue_wrapper';

CREATE FUNCTION outbox.enqueue_message(topic text, payload jsonb, key text DEFAULT NULL,
                                       headers jsonb DEFAULT NULL)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    new_id bigint;
BEGIN
    PERFORM outbox._prepare_enqueue(topic, key, headers, octet_length(payload::text));
    INSERT INTO outbox.messages (topic, key, json_payload, headers)
        VALUES (topic, key, payload, headers)
        RETURNING id INTO new_id;
    RETURN new_id;
END
$$;

CREATE FUNCTION outbox.enqueue_message(topic text, payload bytea, key text DEFAULT NULL,
                                       headers jsonb DEFAULT NULL)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    new_id bigint;
BEGIN
    PERFORM outbox._prepare_enqueue(topic, key, headers, octet_length(payload));
    INSERT INTO outbox.messages (topic, key, payload, headers)
        VALUES (topic, key, payload, headers)
        RETURNING id INTO new_id;
    RETURN new_id;
END
$$;

COMMENT ON FUNCTION outbox.enqueue_message(text, jsonb, text, jsonb) IS
    'Queues a JSON message for Kafka in the current transaction; it is delivered only if the transaction commits. Returns the message id.';
COMMENT ON FUNCTION outbox.enqueue_message(text, bytea, text, jsonb) IS
    'Queues a binary message for Kafka in the current transaction; it is delivered only if the transaction commits. Returns the message id.';

-- Monitoring --------------------------------------------------------------------------------

-- Committed messages not yet acknowledged by the broker.
CREATE VIEW outbox.pending_messages AS
WITH state AS (
    SELECT done_snapshot, window_snapshot, window_last_id,
           pg_snapshot_xmax(done_snapshot) AS done_xmax,
           ARRAY(SELECT pg_snapshot_xip(done_snapshot)) AS done_xip
    FROM outbox.worker_state
)
SELECT m.id, m.topic, m.key, m.enqueued_at, 0 AS attempts, NULL::timestamptz AS next_attempt_at,
       NULL::text AS last_error
FROM outbox.messages m, state s
WHERE (m.txid >= s.done_xmax OR m.txid = ANY (s.done_xip))
  AND NOT (s.window_snapshot IS NOT NULL
           AND pg_visible_in_snapshot(m.txid, s.window_snapshot)
           AND m.id <= s.window_last_id)
UNION ALL
SELECT h.id, h.topic, h.key, h.enqueued_at, h.attempts, h.next_attempt_at, h.last_error
FROM outbox.held_messages h;

CREATE VIEW outbox.topic_stats AS
WITH pending AS (
    SELECT topic, count(*) AS pending, now() - min(enqueued_at) AS oldest_pending_age
    FROM outbox.pending_messages GROUP BY topic
), dead AS (
    SELECT topic, count(*) AS dead_letters FROM outbox.dead_letters GROUP BY topic
)
SELECT coalesce(t.topic, p.topic, d.topic) AS topic,
       coalesce(p.pending, 0) AS pending,
       p.oldest_pending_age,
       coalesce(t.delivered_total, 0) AS delivered_total,
       coalesce(t.failed_attempts, 0) AS failed_attempts,
       coalesce(d.dead_letters, 0) AS dead_letters,
       t.last_delivered_at,
       coalesce(t.paused, false) AS paused
FROM outbox.topics t
FULL JOIN pending p ON p.topic = t.topic
FULL JOIN dead d ON d.topic = coalesce(t.topic, p.topic);

CREATE FUNCTION outbox._worker_status(
    OUT database text, OUT pid integer, OUT state text, OUT broker_state text,
    OUT batches bigint, OUT messages_delivered bigint, OUT in_flight integer,
    OUT wakeups_by_commit bigint, OUT wakeups_by_poll bigint, OUT empty_wakeups bigint,
    OUT last_error text, OUT last_error_at timestamptz, OUT started_at timestamptz)
    RETURNS SETOF record
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'worker_status_wrapper';

CREATE VIEW outbox.worker_status AS
SELECT database, pid, state, broker_state, batches, messages_delivered, in_flight,
       wakeups_by_commit, wakeups_by_poll, empty_wakeups, last_error, last_error_at,
       now() - started_at AS uptime, started_at
FROM outbox._worker_status();

-- Privileges ---------------------------------------------------------------------------------
-- PUBLIC gets nothing. outbox_writer may enqueue (the functions run as their owner, with a fixed
-- search_path); outbox_reader may read the monitoring views. The roles are cluster-wide, so they
-- may exist already from another database.
REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outbox_writer') THEN
        CREATE ROLE outbox_writer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outbox_reader') THEN
        CREATE ROLE outbox_reader NOLOGIN;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA outbox TO outbox_writer, outbox_reader;
GRANT EXECUTE ON FUNCTION outbox.enqueue_message(text, jsonb, text, jsonb),
                          outbox.enqueue_message(text, bytea, text, jsonb) TO outbox_writer;
GRANT SELECT ON outbox.pending_messages, outbox.topic_stats, outbox.worker_status, outbox.dead_letters
    TO outbox_reader;
GRANT EXECUTE ON FUNCTION outbox._worker_status() TO outbox_reader;
