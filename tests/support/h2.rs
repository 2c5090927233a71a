//! HTTP/2 requests (h2c) through the official Python `h2` library, for what HTTP/1.1
//! cannot send: a request that ends with trailers.

use super::{ensure, repo_root};

pub struct H2Response {
    pub status: u16,
    pub headers: serde_json::Value,
    pub body: String,
}

impl H2Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.as_str())
    }
}

/// Sends one request; `trailers` ends it with a trailer block instead of the body.
pub fn request(
    port: u16,
    method: &str,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    trailers: bool,
) -> H2Response {
    let python = ensure("ensure-llm-venv.sh");
    let mut args = vec![
        repo_root()
            .join("tests/support/h2_request.py")
            .display()
            .to_string(),
        port.to_string(),
        method.to_string(),
        path.to_string(),
        authority.to_string(),
        body.to_string(),
    ];
    if trailers {
        args.push("--trailers".into());
    }
    for (k, v) in headers {
        args.push("--header".into());
        args.push(format!("{k}:{v}"));
    }
    let out = std::process::Command::new(python)
        .args(&args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "h2 client: {e}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    H2Response {
        status: v["status"].as_u64().unwrap_or(0) as u16,
        headers: v["headers"].clone(),
        body: v["body"].as_str().unwrap_or("").to_string(),
    }
}
