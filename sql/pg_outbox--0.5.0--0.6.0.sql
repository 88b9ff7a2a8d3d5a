-- pg_outbox 0.5.0 -> 0.6.0
\echo Use "ALTER EXTENSION pg_outbox UPDATE TO '0.6.0'" to load this file. \quit

-- A delayed message is stored where every other message is, with the time it is due, and takes
-- its place in its key's line as the others do: in commit order, when the worker first reads it.
-- Before, it was written straight into held_messages and took its place there at enqueue, ahead
-- of a message of its key committed earlier that the worker had not read yet (the worker gives a
-- message its place when it holds it): when both waited behind a retry, the delayed one went
-- first, even after a message enqueued before it in the same transaction. The worker moves a
-- message not due yet to held_messages (delayed, outside its line until due) as soon as it
-- reads it. Delayed messages stored before this version keep their place.
ALTER TABLE outbox.messages ADD COLUMN deliver_at timestamptz;

CREATE OR REPLACE FUNCTION outbox._store_message(topic text, key text, payload bytea, json_payload jsonb,
                                                 headers jsonb, deliver_at timestamptz)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO outbox.messages (topic, key, payload, json_payload, headers, deliver_at)
        VALUES (topic, key, payload, json_payload, headers, CASE WHEN deliver_at > now() THEN deliver_at END)
        RETURNING id INTO new_id;
    RETURN new_id;
END
$$;

-- A delayed message the worker has not read yet is pending with the time it is due, as it will
-- be once held; topic_stats counts it as scheduled, not pending, in the same pass over the
-- pending messages.
CREATE OR REPLACE VIEW outbox.pending_messages AS
WITH state AS (
    SELECT done_snapshot, window_snapshot, window_last_id,
           pg_snapshot_xmax(done_snapshot) AS done_xmax,
           ARRAY(SELECT pg_snapshot_xip(done_snapshot)) AS done_xip
    FROM outbox.worker_state
)
SELECT m.id, m.topic, m.key, m.enqueued_at, 0 AS attempts, m.deliver_at AS next_attempt_at,
       NULL::text AS last_error
FROM outbox.messages m, state s
WHERE (m.txid >= s.done_xmax OR m.txid = ANY (s.done_xip))
  AND NOT (s.window_snapshot IS NOT NULL
           AND pg_visible_in_snapshot(m.txid, s.window_snapshot)
           AND m.id <= s.window_last_id)
UNION ALL
SELECT h.id, h.topic, h.key, h.enqueued_at, h.attempts, h.next_attempt_at, h.last_error
FROM outbox.held_messages h;

CREATE OR REPLACE VIEW outbox.topic_stats AS
WITH queued AS (
    SELECT topic,
           count(*) FILTER (WHERE NOT scheduled) AS pending,
           now() - min(enqueued_at) FILTER (WHERE NOT scheduled) AS oldest_pending_age,
           count(*) FILTER (WHERE scheduled) AS scheduled
    FROM (SELECT topic, enqueued_at, coalesce(attempts = 0 AND next_attempt_at > now(), false) AS scheduled
          FROM outbox.pending_messages) m
    GROUP BY topic
), dead AS (
    SELECT topic, count(*) AS dead_letters FROM outbox.dead_letters GROUP BY topic
), topics AS (
    SELECT topic FROM outbox.topics UNION SELECT topic FROM queued UNION SELECT topic FROM dead
)
SELECT n.topic,
       coalesce(p.pending, 0) AS pending,
       p.oldest_pending_age,
       coalesce(p.scheduled, 0) AS scheduled,
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
LEFT JOIN queued p USING (topic)
LEFT JOIN dead d USING (topic);
