-- pg_outbox 0.2.0 -> 0.3.0
\echo Use "ALTER EXTENSION pg_outbox UPDATE TO '0.3.0'" to load this file. \quit

-- enqueue_message() becomes one C function: it checks the message and inserts it straight into
-- the current storage slot's partition through a plan kept for the session. Before, each call
-- went through two PL/pgSQL functions, each switching search_path on entry and exit, and routed
-- its row through the partitioned parent. Same arguments, defaults, results and errors; grants
-- are kept. No SET search_path: the function runs only schema-qualified statements with typed
-- parameters, so the caller's search_path cannot redirect it.
CREATE OR REPLACE FUNCTION outbox.enqueue_message(topic text, payload jsonb, key text DEFAULT NULL,
                                                  headers jsonb DEFAULT NULL,
                                                  deliver_after interval DEFAULT NULL,
                                                  deliver_at timestamptz DEFAULT NULL)
    RETURNS bigint
    LANGUAGE c VOLATILE SECURITY DEFINER
    AS 'MODULE_PATHNAME', 'enqueue_json_message';

CREATE OR REPLACE FUNCTION outbox.enqueue_message(topic text, payload bytea, key text DEFAULT NULL,
                                                  headers jsonb DEFAULT NULL,
                                                  deliver_after interval DEFAULT NULL,
                                                  deliver_at timestamptz DEFAULT NULL)
    RETURNS bigint
    LANGUAGE c VOLATILE SECURITY DEFINER
    AS 'MODULE_PATHNAME', 'enqueue_bytea_message';
