-- pg_outbox 0.6.0 -> 0.7.0
\echo Use "ALTER EXTENSION pg_outbox UPDATE TO '0.7.0'" to load this file. \quit

-- A route the worker could not follow is refused when it is written (SQLSTATE 22023, naming the
-- column and the property, never a value), not found later by the worker, which could only hold
-- its topic's messages back and say so in the log: a Kafka topic name Kafka would refuse, an
-- empty bootstrap_servers, kafka_properties without a cluster of their own (they were ignored),
-- and a property librdkafka does not know or a value it refuses. Routes written before this
-- version are not checked again until they are updated (NOT VALID); the worker still reports
-- any it cannot follow.
CREATE FUNCTION outbox._check_destination(topic text, kafka_topic text, bootstrap_servers text,
                                          kafka_properties text)
    RETURNS boolean
    LANGUAGE c IMMUTABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'check_destination_wrapper';

ALTER TABLE outbox.destinations ADD CONSTRAINT destinations_route_check
    CHECK (outbox._check_destination(topic, kafka_topic, bootstrap_servers, kafka_properties)) NOT VALID;

-- Routes and pauses are configuration: pg_dump keeps them (the messages, their state and the
-- counters are not: a restored database starts with an empty outbox).
SELECT pg_catalog.pg_extension_config_dump('outbox.destinations', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.topics', 'WHERE paused');
