//! A minimal blocking HTTP/1.1 client with keep-alive, enough to drive Envoy.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The refusal code (`x-pag0-error`), checked against the JSON body.
    pub fn error_code(&self) -> Option<String> {
        let header = self.header("x-pag0-error")?.to_string();
        let body = self.json();
        assert_eq!(
            body["error"]["code"],
            header.as_str(),
            "body and header disagree"
        );
        Some(header)
    }

    pub fn cost(&self) -> u64 {
        self.header("x-pag0-cost")
            .unwrap_or_else(|| panic!("no x-pag0-cost on {} response", self.status))
            .parse()
            .unwrap()
    }

    /// One entry of `x-pag0-budget-remaining`.
    pub fn remaining(&self, scope: &str) -> Option<u64> {
        dict_value(self.header("x-pag0-budget-remaining")?, scope)?
            .parse()
            .ok()
    }
}

pub fn dict_value<'a>(dict: &'a str, key: &str) -> Option<&'a str> {
    dict.split(',').find_map(|item| {
        let (k, v) = item.trim().split_once('=')?;
        (k == key).then_some(v)
    })
}

pub struct Client {
    port: u16,
    stream: Option<BufReader<TcpStream>>,
}

impl Client {
    pub fn new(port: u16) -> Client {
        Client { port, stream: None }
    }

    fn connect(&mut self) -> &mut BufReader<TcpStream> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            stream.set_nodelay(true).unwrap();
            self.stream = Some(BufReader::new(stream));
        }
        self.stream.as_mut().unwrap()
    }

    /// Sends a request with `host` as the Host header; retries once on a stale
    /// keep-alive connection.
    pub fn send(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        let mut raw = format!(
            "{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {}\r\n",
            body.len()
        )
        .into_bytes();
        for (k, v) in headers {
            raw.extend_from_slice(k.as_bytes());
            raw.extend_from_slice(b": ");
            raw.extend_from_slice(v.as_bytes());
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"\r\n");
        raw.extend_from_slice(body);
        self.send_raw(&raw)
    }

    pub fn send_raw(&mut self, raw: &[u8]) -> Response {
        for attempt in 0..2 {
            let stream = self.connect();
            if stream.get_mut().write_all(raw).is_ok() {
                match read_response(stream) {
                    Ok(response) => {
                        if response
                            .header("connection")
                            .is_some_and(|c| c.eq_ignore_ascii_case("close"))
                        {
                            self.stream = None;
                        }
                        return response;
                    }
                    Err(e) if attempt == 1 => panic!("reading response: {e}"),
                    Err(_) => {}
                }
            }
            self.stream = None;
        }
        panic!("request failed twice")
    }

    pub fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        self.send("GET", host, path, headers, b"")
    }

    pub fn post(
        &mut self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Response {
        self.send("POST", host, path, headers, body.as_bytes())
    }
}

fn read_response(stream: &mut BufReader<TcpStream>) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut line = String::new();
    if stream.read_line(&mut line)? == 0 {
        return Err(bad("connection closed"));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut headers = Vec::new();
    loop {
        // Header values may hold bytes that are not UTF-8: kept, lossily, as text.
        let mut raw = Vec::new();
        stream.read_until(b'\n', &mut raw)?;
        let h = String::from_utf8_lossy(&raw);
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if let Some(len) = find("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
        body.resize(len, 0);
        stream.read_exact(&mut body)?;
    } else if find("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        loop {
            let mut size = String::new();
            stream.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim(), 16).map_err(|_| bad("bad chunk"))?;
            let mut chunk = vec![0; size + 2];
            stream.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}
