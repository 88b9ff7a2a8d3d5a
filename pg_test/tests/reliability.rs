//! The checker's fault scenarios, short: under a mixed concurrent workload (commit, rollback,
//! savepoints, failing statements, two-phase commit, long transactions), with the fault injected
//! and healed, nothing committed is lost, nothing rolled back appears, per-key commit order
//! holds, and duplicates appear only where a crash resends one batch.
//! `make reliability` runs the same scenarios for longer and writes docs/RELIABILITY.md.
use pg_outbox_tests::checker::{run, Fault, Scenario, Workload};
use pg_outbox_tests::BrokerKind;

fn check(broker: BrokerKind, fault: Fault) {
    let report = run(&Scenario::new(broker, fault), &Workload::short());
    eprintln!("{}", report.markdown_row());
    let violations = report.violations();
    if !violations.is_empty() {
        eprintln!("server log (pg_outbox lines and errors, last 60):\n{}", report.server_log_tail);
    }
    assert!(violations.is_empty(), "{}: {}", report.fault, violations.join(", "));
}

#[test]
fn kafka_baseline_loses_nothing_and_keeps_key_order() {
    check(BrokerKind::Kafka, Fault::None);
}

#[test]
fn kafka_killed_and_restarted() {
    check(BrokerKind::Kafka, Fault::BrokerKilled);
}

#[test]
fn kafka_frozen_for_15_seconds() {
    check(BrokerKind::Kafka, Fault::BrokerFrozen { seconds: 15 });
}

#[test]
fn kafka_slower_than_the_message_timeout() {
    check(BrokerKind::Kafka, Fault::BrokerSlowerThanMessageTimeout);
}

#[test]
fn worker_terminated_three_times() {
    check(BrokerKind::Kafka, Fault::WorkerTerminated);
}

#[test]
fn worker_killed_with_sigkill() {
    check(BrokerKind::Kafka, Fault::WorkerKilled);
}

#[test]
fn postgres_stopped_immediately_mid_forwarding() {
    check(BrokerKind::Kafka, Fault::PostgresImmediateStop);
}

#[test]
fn a_fatal_idempotent_producer_error_recreates_the_producer() {
    check(BrokerKind::Kafka, Fault::ProducerFatalError);
}

#[test]
fn the_extension_created_after_server_start() {
    check(BrokerKind::Kafka, Fault::ExtensionCreatedAfterStart);
}

#[test]
fn tansu_killed_and_restarted() {
    check(BrokerKind::Tansu, Fault::BrokerKilled);
}

#[test]
fn tansu_frozen_for_20_seconds() {
    check(BrokerKind::Tansu, Fault::BrokerFrozen { seconds: 20 });
}

#[test]
fn drop_extension_and_drop_database_next_door_neither_hang_nor_leak() {
    check(BrokerKind::Kafka, Fault::NeighbourDatabaseDropped);
}

#[test]
fn failover_to_a_synchronous_hot_standby() {
    check(BrokerKind::Kafka, Fault::FailoverToStandby);
}

#[test]
fn three_node_kafka_loses_a_partition_leader_then_a_second_broker() {
    check(BrokerKind::KafkaCluster, Fault::LeaderThenSecondBrokerLost);
}
