/// One message as the worker read it from the outbox, ready to be produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundMessage {
    /// The outbox message id (stable across redeliveries).
    pub id: i64,
    pub topic: String,
    pub key: Option<String>,
    /// `None` is a Kafka tombstone (a NULL payload).
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    /// Failed attempts so far (0 for a message seen for the first time).
    pub attempts: i32,
    /// True when the row lives in `outbox.held_messages` (a retry, or released by a resumed topic).
    pub held: bool,
    /// A fresh message enqueued with `deliver_after` / `deliver_at` that is not due yet: it waits
    /// in `outbox.held_messages`, outside its key's line until then.
    pub scheduled: bool,
}

/// The header every record carries so that consumers can drop redeliveries.
pub const MESSAGE_ID_HEADER: &str = "pg_outbox_message_id";

/// A message id that is unique across clusters and databases: `<system id>-<database oid>-<id>`.
pub fn global_message_id(system_identifier: u64, database_oid: u32, id: i64) -> String {
    let mut id_text = String::new();
    MessageIds::new(system_identifier, database_oid).write(id, &mut id_text);
    id_text
}

/// Writes the `global_message_id` of each row of one database into a buffer the caller reuses:
/// the sink does it for every message it sends, and a `format!` each was 7 % of the worker's
/// time in a drain.
pub struct MessageIds {
    prefix: String,
}

impl MessageIds {
    pub fn new(system_identifier: u64, database_oid: u32) -> MessageIds {
        MessageIds { prefix: format!("{system_identifier}-{database_oid}-") }
    }

    pub fn write<'a>(&self, id: i64, out: &'a mut String) -> &'a str {
        out.clear();
        out.push_str(&self.prefix);
        if id < 0 {
            out.push('-');
        }
        let mut digits = [0u8; 20];
        let mut n = id.unsigned_abs();
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        out.extend(digits[start..].iter().map(|&d| d as char));
        out
    }
}

/// Parses the headers column (a JSON object of string values, as `enqueue_message` enforces).
pub fn parse_headers(json: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let Some(json) = json else { return Ok(Vec::new()) };
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("headers are not valid JSON: {e}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err("headers must be a JSON object".into());
    };
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            other => Err(format!("header \"{k}\" must be a string, not {other}")),
        })
        .collect()
}

/// Kafka's own rule for topic names: 1 to 249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("topic must not be empty".into());
    }
    if topic.len() > 249 {
        return Err(format!("topic is {} characters long; Kafka allows at most 249", topic.len()));
    }
    if topic == "." || topic == ".." {
        return Err(format!("topic \"{topic}\" is not allowed by Kafka"));
    }
    if let Some(c) = topic.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!(
            "topic \"{}\" contains {:?}; Kafka topic names may only contain ASCII letters, digits, '.', '_' and '-'",
            topic.escape_default(),
            c
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_must_be_an_object_of_strings() {
        assert_eq!(parse_headers(None).unwrap(), vec![]);
        assert_eq!(
            parse_headers(Some(r#"{"source": "shop", "v": "2"}"#)).unwrap(),
            vec![("source".to_string(), "shop".to_string()), ("v".to_string(), "2".to_string())]
        );
        assert!(parse_headers(Some(r#"{"v": 2}"#)).unwrap_err().contains("must be a string"));
        assert!(parse_headers(Some(r#"["a"]"#)).unwrap_err().contains("JSON object"));
    }

    #[test]
    fn topic_names_follow_kafkas_rules() {
        assert!(validate_topic("orders.created").is_ok());
        assert!(validate_topic("a-b_c.D9").is_ok());
        assert!(validate_topic(&"x".repeat(249)).is_ok());
        assert!(validate_topic(&"x".repeat(250)).is_err());
        assert!(validate_topic("").is_err());
        assert!(validate_topic(".").is_err());
        assert!(validate_topic("..").is_err());
        assert!(validate_topic("orders created").is_err());
        assert!(validate_topic("orders/created").is_err());
        assert!(validate_topic("ordérs").is_err());
    }

    #[test]
    fn message_ids_name_cluster_database_and_row() {
        assert_eq!(global_message_id(7, 16384, 42), "7-16384-42");
        let ids = MessageIds::new(7306940290385461335, 16384);
        let mut buffer = String::from("left over from the message before");
        assert_eq!(ids.write(0, &mut buffer), "7306940290385461335-16384-0");
        assert_eq!(ids.write(i64::MAX, &mut buffer), "7306940290385461335-16384-9223372036854775807");
        assert_eq!(ids.write(-12, &mut buffer), "7306940290385461335-16384--12");
    }
}
