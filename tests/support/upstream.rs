//! An in-process upstream that answers every request and records what reached it.
//! A path containing `/status/NNN/` answers with status NNN, `/delay/MS/` waits MS
//! milliseconds first, `/size/N/` answers N bytes; anything else answers 200 with a JSON
//! body that numbers the call (so a cached answer can be told from a fresh one).
//!
//! Markers for answers that break caches and filters: `/cc/VALUE/` sends
//! `Cache-Control: VALUE` (`_` for spaces), `/cookie/` a `Set-Cookie`, `/vary/NAME/` a
//! `Vary`, `/gzip/` a gzip-encoded answer to clients that accept it, `/range/` a 206 to a
//! `Range` request, `/sse/` an event stream of 3 events 1 s apart, `/badbytes/` header
//! values that are not UTF-8 (also in the settlement of a paid call). x402: `/x402/`
//! (v2) settles any payment, `/x402-reject/` answers 402 again, `/x402-fail/` answers 402
//! again with a failed v2 settlement naming `insufficient_funds`, `/x402-nosettle/` 200
//! without settlement, `/x402v1/` offers in a v1 body and settles `X-PAYMENT`.

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
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let mut body = vec![0; len];
        if chunked {
            // A chunked body (an HTTP/2 request with trailers arrives so), then trailers.
            body.clear();
            loop {
                let mut size = String::new();
                if reader.read_line(&mut size).is_err() {
                    return;
                }
                let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
                    return;
                };
                if n == 0 {
                    loop {
                        let mut trailer = String::new();
                        if reader.read_line(&mut trailer).is_err() || trailer.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let mut chunk = vec![0; n + 2];
                if reader.read_exact(&mut chunk).is_err() {
                    return;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if reader.read_exact(&mut body).is_err() {
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
        let request_header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let accepts_gzip = request_header("accept-encoding").is_some_and(|v| v.contains("gzip"));
        let ranged = request_header("range").is_some();
        if path.contains("/sse/") {
            if record.load(Ordering::Relaxed) {
                seen.lock().unwrap().push(Seen {
                    method,
                    path: path.clone(),
                    headers,
                    body,
                });
            }
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            if writer.write_all(head.as_bytes()).is_err() {
                return;
            }
            for i in 0..3 {
                let event = format!("data: {{\"n\":{i}}}\n\n");
                let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                if writer.write_all(chunk.as_bytes()).is_err() || writer.flush().is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1000));
            }
            let _ = writer.write_all(b"0\r\n\r\n");
            continue;
        }
        if record.load(Ordering::Relaxed) {
            seen.lock().unwrap().push(Seen {
                method,
                path: path.clone(),
                headers: headers.clone(),
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
        // A stand-in signer: `/sign` answers a (fake-signed) payment header of the
        // version asked.
        let signed = path == "/sign";
        let signer_v1 = signed && String::from_utf8_lossy(&body_copy).contains("\"x402Version\":1");
        // `/x402-v1bad/`: a 402 whose body claims x402 v1 but offers nothing readable.
        let v1_bad = path.contains("/x402-v1bad/");
        let v1 = path.contains("/x402v1/");
        let v1_offer = r#"{"x402Version":1,"error":"X-PAYMENT header is required","accepts":[{"scheme":"exact","network":"base-sepolia","maxAmountRequired":"10000","resource":"http://paid.api/x402v1/","description":"","mimeType":"application/json","payTo":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C","maxTimeoutSeconds":60,"asset":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","extra":{"name":"USDC","version":"2"}}]}"#;
        let mut payload = match size {
            _ if v1_bad => r#"{"x402Version":1,"accepts":"nope"}"#.to_string(),
            _ if v1 && !paid => v1_offer.to_string(),
            _ if approval.is_some() => approval.clone().unwrap_or_default(),
            _ if signer_v1 => format!(
                r#"{{"header":"X-PAYMENT","value":"{}"}}"#,
                pag0::core::base64::encode(
                    br#"{"x402Version":1,"payload":{"signature":"0xsigned"}}"#
                )
            ),
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
        }
        .into_bytes();
        // A stand-in x402 server (see the module's comment).
        let mut extra: Vec<u8> = Vec::new();
        let mut status = status;
        let settled = |header: &str| -> Vec<u8> {
            let settlement = format!(
                r#"{{"success":true,"transaction":"0x{}","network":"eip155:84532"}}"#,
                "ab".repeat(32)
            );
            format!(
                "{header}: {}\r\n",
                pag0::core::base64::encode(settlement.as_bytes())
            )
            .into_bytes()
        };
        if v1_bad {
            status = 402;
        } else if v1 {
            if paid {
                extra = settled("x-payment-response");
            } else {
                status = 402;
            }
        } else if path.contains("/x402") {
            let offer = r#"{"x402Version":2,"resource":{"url":"http://paid.api/x"},"accepts":[{"scheme":"exact","network":"eip155:84532","amount":"10000","asset":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","payTo":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C","maxTimeoutSeconds":60,"extra":{"name":"USDC","version":"2"}}]}"#;
            let required = format!(
                "payment-required: {}\r\n",
                pag0::core::base64::encode(offer.as_bytes())
            );
            if !paid || path.contains("/x402-reject/") {
                status = 402;
                extra = required.into_bytes();
            } else if path.contains("/x402-fail/") {
                status = 402;
                let failed = r#"{"success":false,"errorReason":"insufficient_funds","transaction":"","network":"eip155:84532"}"#;
                extra = format!(
                    "{required}payment-response: {}\r\n",
                    pag0::core::base64::encode(failed.as_bytes())
                )
                .into_bytes();
            } else if path.contains("/badbytes/") {
                extra = b"payment-response: \xff\xfe\xfd\r\n".to_vec();
            } else if !path.contains("/x402-nosettle/") {
                extra = settled("payment-response");
            }
        }
        if path.contains("/badbytes/") {
            extra.extend_from_slice(b"x-weird: caf\xe9 \xff\r\n");
        }
        if let Some(cc) = path
            .split_once("/cc/")
            .and_then(|(_, rest)| rest.split('/').next())
        {
            extra.extend_from_slice(
                format!("cache-control: {}\r\n", cc.replace('_', " ")).as_bytes(),
            );
        }
        if path.contains("/cookie/") {
            extra.extend_from_slice(b"set-cookie: session=abc\r\n");
        }
        if let Some(v) = path
            .split_once("/vary/")
            .and_then(|(_, rest)| rest.split('/').next())
        {
            extra.extend_from_slice(format!("vary: {v}\r\n").as_bytes());
        }
        if path.contains("/gzip/") {
            extra.extend_from_slice(b"vary: accept-encoding\r\n");
            if accepts_gzip {
                extra.extend_from_slice(b"content-encoding: gzip\r\n");
                payload = b"\x1f\x8b\x08\x00gzip-bytes".to_vec();
            }
        }
        if path.contains("/range/") && ranged {
            status = 206;
            extra.extend_from_slice(
                format!("content-range: bytes 0-3/{}\r\n", payload.len()).as_bytes(),
            );
            payload.truncate(4);
        }
        let mut response =
            format!("HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n").into_bytes();
        response.extend_from_slice(&extra);
        response.extend_from_slice(format!("content-length: {}\r\n\r\n", payload.len()).as_bytes());
        response.extend_from_slice(&payload);
        if writer.write_all(&response).is_err() {
            return;
        }
    }
}
