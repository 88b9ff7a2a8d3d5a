-- pg_outbox 0.7.0 -> 0.8.0
\echo Use "ALTER EXTENSION pg_outbox UPDATE TO '0.8.0'" to load this file. \quit

-- Message ids a new timeline does not give again. After a failover to an asynchronous standby or
-- a point-in-time recovery, the id sequence is where the WAL that reached the new server left it,
-- and ids the old primary gave after that may be in Kafka already. The first id given on a
-- timeline other than the one recorded here moves outbox.message_id_seq 2^40 ahead for each
-- timeline number between them, once, and records the timeline. Like the ids, the record is
-- not rolled back and replicates. 0 until the first id is given after this update.
CREATE SEQUENCE outbox.message_id_timeline MINVALUE 0 START 0;

-- nextval, after that check. enqueue_message takes its ids the same way.
CREATE FUNCTION outbox._next_message_id(sequence regclass)
    RETURNS bigint
    LANGUAGE c VOLATILE STRICT PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'next_message_id';
-- Unlike every other function here, PUBLIC's: a role given INSERT on outbox.messages needs it for
-- the default. It takes ids with the sequence's own privileges, as nextval does, and moves no
-- sequence but the outbox's.
GRANT EXECUTE ON FUNCTION outbox._next_message_id(regclass) TO PUBLIC;

-- Every slot partition takes the parent's new default. (COPY into outbox.messages keeps its
-- speed: the slot's default, a function too, already kept it from batching rows.)
ALTER TABLE outbox.messages ALTER COLUMN id SET DEFAULT outbox._next_message_id('outbox.message_id_seq');
