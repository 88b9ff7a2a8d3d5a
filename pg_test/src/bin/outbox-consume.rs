//! Prints the records of a Kafka topic, from the beginning: key, headers and payload.
//!   outbox-consume BOOTSTRAP TOPIC [EXPECTED] [TIMEOUT_SECS]
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: outbox-consume BOOTSTRAP TOPIC [EXPECTED] [TIMEOUT_SECS]");
        std::process::exit(2);
    }
    let expected: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let timeout: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(10);
    let records = pg_outbox_tests::read_topic(&args[1], &args[2], expected, Duration::from_secs(timeout));
    for r in &records {
        let mut headers: Vec<_> = r.headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
        headers.sort();
        println!(
            "{}[{}]@{} key={} headers={{{}}} payload={}",
            r.topic,
            r.partition,
            r.offset,
            r.key.as_deref().unwrap_or("(null)"),
            headers.join(", "),
            r.payload.as_deref().map(String::from_utf8_lossy).unwrap_or_else(|| "(null)".into())
        );
    }
    println!("{} record(s) in {}", records.len(), args[2]);
}
