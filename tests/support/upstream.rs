//! An in-process upstream that answers every request and records what reached it.
//! A path containing `/status/NNN/` answers with status NNN, `/delay/MS/` waits MS
//! milliseconds first, `/size/N/` answers N bytes; anything else answers 200 with a JSON
//! body that numbers the call (so a cached answer can be told from a fresh one).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

pub struct Upstream {
    pub port: u16,
    count: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    record: Arc<AtomicBool>,
}

impl Upstream {
    pub fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Upstream {
            port,
            count: Arc::new(AtomicU64::new(0)),
            seen: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
            record: Arc::new(AtomicBool::new(true)),
        };
        let (count, seen, stop, record) = (
            up.count.clone(),
            up.seen.clone(),
            up.stop.clone(),
            up.record.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (count, seen, record) = (count.clone(), seen.clone(), record.clone());
                std::thread::spawn(move || serve(conn, &count, &seen, &record));
            }
        });
        up
    }

    /// Stop keeping request details (for load tests); counting goes on.
    pub fn stop_recording(&self) {
        self.record.store(false, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen().pop().expect("upstream saw no request")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(conn: TcpStream, count: &AtomicU64, seen: &Mutex<Vec<Seen>>, record: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = conn.set_nodelay(true);
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).is_err() {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let paid = headers
            .iter()
            .any(|(k, _)| k == "payment-signature" || k == "x-payment");
        let body_copy = body.clone();
        // The demo's alert webhook shares this upstream; it is not an API call.
        if !path.starts_with("/_demo/") {
            count.fetch_add(1, Ordering::Relaxed);
        }
        let status: u16 = path
            .split_once("/status/")
            .and_then(|(_, rest)| rest.split('/').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(200);
        let number_after = |marker: &str| -> Option<u64> {
            path.split_once(marker)
                .and_then(|(_, rest)| rest.split('/').next())
                .and_then(|s| s.parse().ok())
        };
        if let Some(ms) = number_after("/delay/") {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let size = number_after("/size/");
        if record.load(Ordering::Relaxed) {
            seen.lock().unwrap().push(Seen {
                method,
                path: path.clone(),
                headers,
                body,
            });
        }
        // A stand-in approval service: approves prices up to 100000.
        let approval = path.starts_with("/approve").then(|| {
            let price = serde_json::from_slice::<serde_json::Value>(&body_copy)
                .ok()
                .and_then(|v| v["price"].as_str().and_then(|p| p.parse::<u64>().ok()))
                .unwrap_or(u64::MAX);
            format!(
                r#"{{"approved":{},"reason":"limit 100000"}}"#,
                price <= 100_000
            )
        });
        // A stand-in signer: `/sign` answers a (fake-signed) v2 payment header.
        let signed = path == "/sign";
        // `/x402-v1bad/`: a 402 whose body claims x402 v1 but offers nothing readable.
        let v1_bad = path.contains("/x402-v1bad/");
        let payload = match size {
            _ if v1_bad => r#"{"x402Version":1,"accepts":"nope"}"#.to_string(),
            _ if approval.is_some() => approval.clone().unwrap_or_default(),
            _ if signed => format!(
                r#"{{"header":"PAYMENT-SIGNATURE","value":"{}"}}"#,
                pag0::core::base64::encode(
                    br#"{"x402Version":2,"payload":{"signature":"0xsigned"}}"#
                )
            ),
            Some(n) => "x".repeat(n as usize),
            None => format!(
                "{{\"ok\":true,\"path\":{path:?},\"n\":{}}}",
                count.load(Ordering::Relaxed)
            ),
        };
        // A stand-in x402 server: `/x402/` settles any payment it gets, `/x402-reject/`
        // answers 402 again, `/x402-nosettle/` answers 200 without a settlement.
        let mut extra = String::new();
        let mut status = status;
        if v1_bad {
            status = 402;
        } else if path.contains("/x402") {
            if !paid || path.contains("/x402-reject/") {
                status = 402;
                let offer = r#"{"x402Version":2,"resource":{"url":"http://paid.api/x"},"accepts":[{"scheme":"exact","network":"eip155:84532","amount":"10000","asset":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","payTo":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C","maxTimeoutSeconds":60,"extra":{"name":"USDC","version":"2"}}]}"#;
                extra = format!(
                    "payment-required: {}\r\n",
                    pag0::core::base64::encode(offer.as_bytes())
                );
            } else if !path.contains("/x402-nosettle/") {
                let settlement = format!(
                    r#"{{"success":true,"transaction":"0x{}","network":"eip155:84532"}}"#,
                    "ab".repeat(32)
                );
                extra = format!(
                    "payment-response: {}\r\n",
                    pag0::core::base64::encode(settlement.as_bytes())
                );
            }
        }
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{payload}",
            payload.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}
