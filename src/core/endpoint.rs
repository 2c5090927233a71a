//! An endpoint is `host/path`: host lowercased, port, query and fragment dropped, and
//! the path normalised so that `%73earch`, `a/../search` or `//search` cannot slip
//! past an allow or block list under another spelling.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointError {
    MissingHost,
    BadHost,
    BadPath,
}

impl std::fmt::Display for EndpointError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndpointError::MissingHost => f.write_str("request has no host"),
            EndpointError::BadHost => f.write_str("request host is malformed"),
            EndpointError::BadPath => f.write_str("request path is malformed"),
        }
    }
}

/// Builds the endpoint from the `:authority` and `:path` pseudo-headers.
pub fn endpoint(authority: &[u8], path: &[u8]) -> Result<String, EndpointError> {
    let host = host_of(authority)?;
    let path = normalize_path(path)?;
    let mut out = String::with_capacity(host.len() + path.len());
    out.push_str(&host);
    out.push_str(&path);
    Ok(out)
}

fn host_of(authority: &[u8]) -> Result<String, EndpointError> {
    if authority.is_empty() {
        return Err(EndpointError::MissingHost);
    }
    let text = std::str::from_utf8(authority).map_err(|_| EndpointError::BadHost)?;
    let host = if let Some(rest) = text.strip_prefix('[') {
        // IPv6 literal: keep the brackets, drop the port.
        let end = rest.find(']').ok_or(EndpointError::BadHost)?;
        &text[..end + 2]
    } else {
        text.split(':').next().unwrap_or(text)
    };
    if host.is_empty()
        || !host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':')
        })
    {
        return Err(EndpointError::BadHost);
    }
    Ok(host.trim_end_matches('.').to_ascii_lowercase())
}

/// Drops query and fragment, decodes percent-escapes of unreserved characters, merges
/// repeated slashes and resolves `.` and `..` segments (RFC 3986 §5.2.4).
pub fn normalize_path(raw: &[u8]) -> Result<String, EndpointError> {
    let end = raw
        .iter()
        .position(|b| *b == b'?' || *b == b'#')
        .unwrap_or(raw.len());
    let raw = &raw[..end];
    let mut decoded = Vec::with_capacity(raw.len() + 1);
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let hi = raw.get(i + 1).and_then(|c| hex(*c));
            let lo = raw.get(i + 2).and_then(|c| hex(*c));
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(EndpointError::BadPath);
            };
            let c = hi * 16 + lo;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                decoded.push(c);
            } else {
                // Reserved or non-ASCII: keep it encoded, in upper case, so that one
                // spelling maps to one endpoint.
                decoded.push(b'%');
                decoded.push(HEX[usize::from(hi)]);
                decoded.push(HEX[usize::from(lo)]);
            }
            i += 3;
            continue;
        }
        if b <= b' ' || b >= 0x7f {
            return Err(EndpointError::BadPath);
        }
        decoded.push(b);
        i += 1;
    }
    let text = String::from_utf8(decoded).map_err(|_| EndpointError::BadPath)?;
    let mut segments: Vec<&str> = Vec::new();
    for segment in text.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(text.len() + 1);
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || (text.ends_with('/') && !segments.is_empty()) {
        out.push('/');
    }
    Ok(out)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(a: &str, p: &str) -> String {
        endpoint(a.as_bytes(), p.as_bytes()).unwrap()
    }

    #[test]
    fn host_lowercased_port_and_query_dropped() {
        assert_eq!(
            ep("API.Tavily.com:443", "/search?q=x#f"),
            "api.tavily.com/search"
        );
        assert_eq!(ep("[::1]:8080", "/a"), "[::1]/a");
        assert_eq!(ep("example.com.", "/"), "example.com/");
    }

    #[test]
    fn other_spellings_of_a_path_are_the_same_endpoint() {
        assert_eq!(ep("h", "/v1/%63hat/completions"), "h/v1/chat/completions");
        assert_eq!(ep("h", "//v1///chat"), "h/v1/chat");
        assert_eq!(ep("h", "/v1/x/../chat"), "h/v1/chat");
        assert_eq!(ep("h", "/v1/./chat/"), "h/v1/chat/");
        assert_eq!(ep("h", "/../../etc"), "h/etc");
        assert_eq!(ep("h", "/a%2fb"), "h/a%2Fb");
    }

    #[test]
    fn malformed_requests_are_errors() {
        assert_eq!(endpoint(b"", b"/"), Err(EndpointError::MissingHost));
        assert_eq!(endpoint(b"a b", b"/"), Err(EndpointError::BadHost));
        assert_eq!(endpoint(b"\xff", b"/"), Err(EndpointError::BadHost));
        assert_eq!(endpoint(b"h", b"/%zz"), Err(EndpointError::BadPath));
        assert_eq!(endpoint(b"h", b"/%4"), Err(EndpointError::BadPath));
        assert_eq!(endpoint(b"h", b"/a\x01"), Err(EndpointError::BadPath));
    }
}
