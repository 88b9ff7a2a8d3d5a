//! A TCP proxy in front of a broker whose open connections can be made to go silent, as a
//! firewall or NAT that forgot them would: nothing more passes either way, no reset, no close,
//! while new connections go through.
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    closed: AtomicBool,
}

const TICK: Duration = Duration::from_millis(50);

impl SilencingProxy {
    /// Listens on a free loopback port (`port`); forwards nothing until `forward_to`.
    pub fn bind() -> SilencingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        SilencingProxy { listener, state: Arc::default() }
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().expect("the proxy's address").port()
    }

    /// Forwards each connection to `127.0.0.1:upstream`.
    pub fn forward_to(&self, upstream: u16) {
        let listener = self.listener.try_clone().expect("clone the proxy's listener");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let state = Arc::clone(&self.state);
        std::thread::spawn(move || {
            while !state.closed.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(TICK);
                        continue;
                    }
                    Err(_) => return,
                };
                let number = state.accepted.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else { continue };
                    let state = Arc::clone(&state);
                    std::thread::spawn(move || pump(from, to, number, &state));
                }
            }
        });
    }

    /// Every connection open now goes silent for good; later ones go through.
    pub fn silence_open_connections(&self) {
        self.state.silent_below.store(self.state.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for SilencingProxy {
    fn drop(&mut self) {
        self.state.closed.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either closes, or the proxy does. A silent connection is no
/// longer read from: what its peer sends stays in the kernel's buffers, unanswered.
fn pump(mut from: TcpStream, mut to: TcpStream, number: u64, state: &State) {
    let _ = from.set_read_timeout(Some(TICK));
    let mut buffer = vec![0u8; 64 * 1024];
    while !state.closed.load(Ordering::SeqCst) {
        if number < state.silent_below.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
            continue;
        }
        match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
