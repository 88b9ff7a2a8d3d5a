-- pg_outbox 0.6.0 -> 0.7.0
\echo Use "ALTER EXTENSION pg_outbox UPDATE TO '0.7.0'" to load this file. \quit

-- A route the worker could not follow is refused when it is written (SQLSTATE 22023, naming the
-- column or the property, never a value), not found later by the worker, which could only hold
-- its topic's messages back and say so in the log: a Kafka topic name Kafka would refuse, an
-- empty bootstrap_servers, kafka_properties without a cluster of their own (they were ignored),
-- and a property librdkafka does not know or a value it refuses. Routes written before are
-- checked too: the update stops at the first it refuses, naming it, so that none is left that
-- a restore of a dump (which checks every row it loads) would refuse.
CREATE FUNCTION outbox._check_destination(topic text, kafka_topic text, bootstrap_servers text,
                                          kafka_properties text)
    RETURNS boolean
    LANGUAGE c IMMUTABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'check_destination_wrapper';
-- As every function here: not for PUBLIC. A role given writes on outbox.destinations needs
-- EXECUTE on it too.
REVOKE ALL ON FUNCTION outbox._check_destination(text, text, text, text) FROM PUBLIC;

-- The check takes over the rule of the unnamed CHECK of 0.2.0 (a route renames the topic or
-- names a cluster, or both): that one, failing, showed the row ("Failing row contains"),
-- kafka_properties and all, in the error and the server log.
ALTER TABLE outbox.destinations DROP CONSTRAINT IF EXISTS destinations_check;
ALTER TABLE outbox.destinations ADD CONSTRAINT destinations_route_check
    CHECK (outbox._check_destination(topic, kafka_topic, bootstrap_servers, kafka_properties));

-- pg_dump keeps what was configured: the routes, the paused topics (with their counters), and
-- where message ids were at the dump, so that a restore over the same database does not start
-- them at 1 again (ids given out after the dump are given again). Not the messages: a restored
-- database starts with an empty outbox.
SELECT pg_catalog.pg_extension_config_dump('outbox.destinations', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.topics', 'WHERE paused');
SELECT pg_catalog.pg_extension_config_dump('outbox.message_id_seq', '');
