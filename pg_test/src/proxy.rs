//! A TCP proxy in front of a broker whose connections can be made to go silent, as a firewall or
//! NAT that forgot them would: nothing more passes either way, no reset, no close, while new
//! connections go through.
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::PrivateBroker;

pub struct SilencingProxy {
    listener: TcpListener,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    /// Connections accepted so far; each is known by its number.
    accepted: AtomicU64,
    /// Connections numbered below this are silent.
    silent_below: AtomicU64,
    /// A connection that sends a CreateTopics request goes silent, the request with it.
    silence_topic_creation: AtomicBool,
    /// How many CreateTopics requests the broker never got.
    creations_silenced: AtomicU64,
    closed: AtomicBool,
}

/// One forwarded connection, as both of its directions see it.
struct Connection {
    number: u64,
    silenced: AtomicBool,
}

impl Connection {
    fn silent(&self, state: &State) -> bool {
        self.silenced.load(Ordering::SeqCst) || self.number < state.silent_below.load(Ordering::SeqCst)
    }
}

const TICK: Duration = Duration::from_millis(50);
/// Kafka's API key of CreateTopics requests.
const CREATE_TOPICS: i16 = 19;

impl SilencingProxy {
    /// Listens on a free loopback port (`port`); forwards nothing until `forward_to`.
    pub fn bind() -> SilencingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        SilencingProxy { listener, state: Arc::default() }
    }

    /// A new Apache Kafka broker that clients reach only through a proxy: it gives them the
    /// proxy's address.
    pub fn with_broker() -> (SilencingProxy, PrivateBroker) {
        let proxy = SilencingProxy::bind();
        let broker = PrivateBroker::start_advertising(proxy.port());
        proxy.forward_to(broker.port);
        (proxy, broker)
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().expect("the proxy's address").port()
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// Forwards each connection to `127.0.0.1:upstream`.
    pub fn forward_to(&self, upstream: u16) {
        let listener = self.listener.try_clone().expect("clone the proxy's listener");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let state = Arc::clone(&self.state);
        std::thread::spawn(move || {
            while !state.closed.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    // Blocking, with a read timeout (`pump`): only the listener polls.
                    Ok((client, _)) if client.set_nonblocking(false).is_ok() => client,
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(TICK);
                        continue;
                    }
                    Err(_) => return,
                };
                let number = state.accepted.fetch_add(1, Ordering::SeqCst);
                let connection = Arc::new(Connection { number, silenced: AtomicBool::new(false) });
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                // Both directions or neither: the streams close when dropped here.
                let (Ok(client_in), Ok(server_in)) = (client.try_clone(), server.try_clone()) else { continue };
                for (from, to, requests) in [(client_in, server, Some(Requests::default())), (server_in, client, None)]
                {
                    let (state, connection) = (Arc::clone(&state), Arc::clone(&connection));
                    std::thread::spawn(move || pump(from, to, requests, &connection, &state));
                }
            }
        });
    }

    /// Every connection open now goes silent for good; later ones go through.
    pub fn silence_open_connections(&self) {
        self.state.silent_below.store(self.state.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// From now on, a connection goes silent as it sends a CreateTopics request, which the
    /// broker never gets.
    pub fn silence_topic_creation(&self) {
        self.state.silence_topic_creation.store(true, Ordering::SeqCst);
    }

    /// How many CreateTopics requests went silent (`silence_topic_creation`).
    pub fn creations_silenced(&self) -> u64 {
        self.state.creations_silenced.load(Ordering::SeqCst)
    }
}

impl Drop for SilencingProxy {
    fn drop(&mut self) {
        self.state.closed.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either closes, or the proxy does. A silent connection is no
/// longer read from: what its peer sends stays in the kernel's buffers, unanswered. `requests`
/// follows a client's requests (`None` for the broker's side).
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    mut requests: Option<Requests>,
    connection: &Connection,
    state: &State,
) {
    let _ = from.set_read_timeout(Some(TICK));
    let mut buffer = vec![0u8; 64 * 1024];
    while !state.closed.load(Ordering::SeqCst) {
        if connection.silent(state) {
            std::thread::sleep(TICK);
            continue;
        }
        let n = match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                continue
            }
            Err(_) => break,
        };
        let creates = requests.as_mut().is_some_and(|r| r.read(&buffer[..n]).contains(&CREATE_TOPICS));
        if creates && state.silence_topic_creation.load(Ordering::SeqCst) {
            connection.silenced.store(true, Ordering::SeqCst);
            state.creations_silenced.fetch_add(1, Ordering::SeqCst);
        }
        // Silenced while this was read: it goes nowhere.
        if connection.silent(state) {
            continue;
        }
        if to.write_all(&buffer[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Where a client's stream of Kafka requests is: each is its size (4 bytes), then its API key
/// (2 bytes), then the rest. Plaintext only: TLS would hide the framing.
#[derive(Default)]
struct Requests {
    /// Bytes of the current request still to come after its header.
    remaining: usize,
    /// The header of the next request, as far as it has come.
    header: Vec<u8>,
}

impl Requests {
    /// The API keys of the requests that start in `bytes`, the next bytes of the stream.
    fn read(&mut self, mut bytes: &[u8]) -> Vec<i16> {
        let mut keys = Vec::new();
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let skipped = self.remaining.min(bytes.len());
                self.remaining -= skipped;
                bytes = &bytes[skipped..];
                continue;
            }
            let taken = (6 - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..taken]);
            bytes = &bytes[taken..];
            if let [s0, s1, s2, s3, k0, k1] = self.header[..] {
                keys.push(i16::from_be_bytes([k0, k1]));
                self.remaining = (u32::from_be_bytes([s0, s1, s2, s3]) as usize).saturating_sub(2);
                self.header.clear();
            }
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(key: i16, body: &[u8]) -> Vec<u8> {
        let mut r = ((body.len() + 2) as u32).to_be_bytes().to_vec();
        r.extend_from_slice(&key.to_be_bytes());
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn requests_are_told_apart_however_the_stream_is_cut() {
        let stream: Vec<u8> = [request(3, b"metadata"), request(19, b"create"), request(0, &[7; 300])].concat();
        for cut in 1..stream.len() {
            let mut requests = Requests::default();
            let mut keys = requests.read(&stream[..cut]);
            keys.extend(requests.read(&stream[cut..]));
            assert_eq!(keys, [3, 19, 0], "cut at {cut}");
        }
    }
}
