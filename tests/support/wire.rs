//! A raw HTTP/1.1 server that writes answers byte for byte, as captured
//! from real servers: status line, headers (in their order and case) and
//! body. It records what it read, and closes a connection after an answer
//! that says `Connection: close`, as the real server does.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// A request the server read.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The head as sent, lowercased.
    pub head: String,
    pub body: Vec<u8>,
    pub at: Instant,
}

/// The bytes to write for a request, given it and how many came before it.
pub type Answer = Arc<dyn Fn(&Seen, usize) -> Vec<u8> + Send + Sync>;

pub struct Wire {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Wire {
    /// Serves `answer` on a new loopback port.
    pub async fn start(answer: impl Fn(&Seen, usize) -> Vec<u8> + Send + Sync + 'static) -> Wire {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, Arc::new(answer))
    }

    /// Serves `answer` on `port` (one that refused connections until now).
    pub async fn start_on(port: u16, answer: Answer) -> Wire {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        Self::serve(listener, answer)
    }

    fn serve(listener: TcpListener, answer: Answer) -> Wire {
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(connection(socket, answer.clone(), log.clone()));
            }
        });
        Wire { port, seen }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn received(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A free loopback port, refusing connections until something binds it.
pub fn refusing_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn connection(mut socket: TcpStream, answer: Answer, log: Arc<Mutex<Vec<Seen>>>) {
    let mut buf = Vec::new();
    loop {
        let Some(seen) = read_request(&mut socket, &mut buf).await else {
            return;
        };
        let index = {
            let mut log = log.lock().unwrap();
            log.push(seen.clone());
            log.len() - 1
        };
        let bytes = answer(&seen, index);
        if socket.write_all(&bytes).await.is_err() {
            return;
        }
        let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
        let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
        if head.contains("\r\nconnection: close") {
            let _ = socket.shutdown().await;
            return;
        }
    }
}

/// Reads one request with a `Content-Length` body (what hyper-util sends
/// for a replayed body); `None` at the end of the connection.
async fn read_request(socket: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Seen> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            assert!(
                !head.contains("transfer-encoding"),
                "this server reads Content-Length bodies only"
            );
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let request: Vec<u8> = buf.drain(..end + 4 + len).collect();
                let line = String::from_utf8_lossy(&request[..end]).into_owned();
                let mut words = line.split_whitespace();
                return Some(Seen {
                    method: words.next().unwrap_or_default().to_owned(),
                    path: words.next().unwrap_or_default().to_owned(),
                    head,
                    body: request[end + 4..].to_vec(),
                    at: Instant::now(),
                });
            }
        }
        let n = socket.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// An HTTP/1.1 answer: `head` (status line and headers, `\r\n` between
/// them, without the blank line) and `body`, with `Content-Length` added
/// after the given headers when `length` is set.
pub fn raw(head: &str, body: &[u8], length: bool) -> Vec<u8> {
    let mut out = head.replace('\n', "\r\n").into_bytes();
    if length {
        out.extend_from_slice(format!("\r\nContent-Length: {}", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
    out
}

/// A 200 that echoes the request body, so a caller can tell its own answer.
pub fn echo(seen: &Seen) -> Vec<u8> {
    raw(
        "HTTP/1.1 200 OK\nContent-Type: application/json",
        &seen.body,
        true,
    )
}
