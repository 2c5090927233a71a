//! Just enough JSON to find the fields of an object and where their values lie in the
//! bytes, so that pag0 can read a request's `model` and `max_tokens` and change a value
//! in place, passing every other byte of the body through as the client wrote it (no
//! reordering of keys, no reformatting of numbers). The input is valid JSON already
//! (checked with serde_json first); every index is still checked, never trusted.

use std::ops::Range;

/// One field of an object: its key (decoded: `"max\u005ftokens"` is `max_tokens`) and
/// where its value's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub key: String,
    pub value: Range<usize>,
}

/// An object's fields, and where the object's bytes start (its `{`) and end (after
/// its `}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub fields: Vec<Field>,
    pub span: Range<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanError;

impl Object {
    pub fn get(&self, key: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.key == key)
    }

    /// The first key that appears more than once, if any.
    pub fn duplicate(&self) -> Option<&str> {
        self.fields
            .iter()
            .enumerate()
            .find(|(i, f)| self.fields[..*i].iter().any(|g| g.key == f.key))
            .map(|(_, f)| f.key.as_str())
    }

    /// Where a new field goes (right after the `{`), and whether it needs a comma
    /// after it (the object has fields).
    pub fn insert_at(&self) -> (usize, bool) {
        (self.span.start + 1, !self.fields.is_empty())
    }
}

fn ws(bytes: &[u8], mut at: usize) -> usize {
    while matches!(bytes.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// The end of the string starting at `at` (its opening quote), after the closing quote.
fn skip_string(bytes: &[u8], at: usize) -> Result<usize, ScanError> {
    if bytes.get(at) != Some(&b'"') {
        return Err(ScanError);
    }
    let mut i = at + 1;
    loop {
        match bytes.get(i) {
            None => return Err(ScanError),
            Some(b'"') => return Ok(i + 1),
            Some(b'\\') => i += 2,
            Some(_) => i += 1,
        }
    }
}

/// The end of the value starting at `at`.
fn skip_value(bytes: &[u8], at: usize) -> Result<usize, ScanError> {
    match bytes.get(at) {
        Some(b'"') => skip_string(bytes, at),
        Some(b'{' | b'[') => {
            // Nesting depth only: strings are skipped whole, so brackets inside them
            // never count.
            let mut depth = 0usize;
            let mut i = at;
            loop {
                match bytes.get(i) {
                    None => return Err(ScanError),
                    Some(b'"') => {
                        i = skip_string(bytes, i)?;
                        continue;
                    }
                    Some(b'{' | b'[') => depth += 1,
                    Some(b'}' | b']') => {
                        depth = depth.checked_sub(1).ok_or(ScanError)?;
                        if depth == 0 {
                            return Ok(i + 1);
                        }
                    }
                    Some(_) => {}
                }
                i += 1;
            }
        }
        Some(_) => {
            // A number, true, false or null: up to the next delimiter.
            let mut i = at;
            while let Some(b) = bytes.get(i) {
                if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                i += 1;
            }
            if i == at {
                Err(ScanError)
            } else {
                Ok(i)
            }
        }
        None => Err(ScanError),
    }
}

/// The fields of the object that starts at `at` (after whitespace).
pub fn object_at(bytes: &[u8], at: usize) -> Result<Object, ScanError> {
    let start = ws(bytes, at);
    if bytes.get(start) != Some(&b'{') {
        return Err(ScanError);
    }
    let mut fields = Vec::new();
    let mut i = ws(bytes, start + 1);
    if bytes.get(i) == Some(&b'}') {
        return Ok(Object {
            fields,
            span: start..i + 1,
        });
    }
    loop {
        let key_end = skip_string(bytes, i)?;
        let key: String = serde_json::from_slice(bytes.get(i..key_end).ok_or(ScanError)?)
            .map_err(|_| ScanError)?;
        i = ws(bytes, key_end);
        if bytes.get(i) != Some(&b':') {
            return Err(ScanError);
        }
        let value_start = ws(bytes, i + 1);
        let value_end = skip_value(bytes, value_start)?;
        fields.push(Field {
            key,
            value: value_start..value_end,
        });
        i = ws(bytes, value_end);
        match bytes.get(i) {
            Some(b',') => i = ws(bytes, i + 1),
            Some(b'}') => {
                return Ok(Object {
                    fields,
                    span: start..i + 1,
                })
            }
            _ => return Err(ScanError),
        }
    }
}

/// The body's top-level object; anything after it but whitespace is an error.
pub fn top_object(bytes: &[u8]) -> Result<Object, ScanError> {
    let object = object_at(bytes, 0)?;
    if ws(bytes, object.span.end) != bytes.len() {
        return Err(ScanError);
    }
    Ok(object)
}

/// A change to the body: replace `range` with `bytes` (an empty range inserts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub range: Range<usize>,
    pub bytes: Vec<u8>,
}

/// The body with the edits made (edits must not overlap; applied in order of position).
pub fn apply(body: &[u8], mut edits: Vec<Edit>) -> Vec<u8> {
    edits.sort_by_key(|e| (e.range.start, e.range.end));
    let extra: usize = edits.iter().map(|e| e.bytes.len()).sum();
    let mut out = Vec::with_capacity(body.len() + extra);
    let mut at = 0;
    for e in edits {
        if e.range.start < at || e.range.end > body.len() || e.range.start > e.range.end {
            continue;
        }
        out.extend_from_slice(&body[at..e.range.start]);
        out.extend_from_slice(&e.bytes);
        at = e.range.end;
    }
    out.extend_from_slice(&body[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_fields_and_their_value_bytes() {
        let body = br#" { "model" : "claude", "max_tokens":128000, "thinking": {"type": "enabled", "budget_tokens": 2000}, "s": "a}\"{]" , "n":[1,{"x":"]"}] } "#;
        let o = top_object(body).unwrap();
        let keys: Vec<_> = o.fields.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(keys, ["model", "max_tokens", "thinking", "s", "n"]);
        let value = |k: &str| std::str::from_utf8(&body[o.get(k).unwrap().value.clone()]).unwrap();
        assert_eq!(value("model"), "\"claude\"");
        assert_eq!(value("max_tokens"), "128000");
        assert_eq!(value("s"), r#""a}\"{]""#);
        assert_eq!(value("n"), r#"[1,{"x":"]"}]"#);
        let thinking = object_at(body, o.get("thinking").unwrap().value.start).unwrap();
        assert_eq!(
            &body[thinking.get("budget_tokens").unwrap().value.clone()],
            b"2000"
        );
        assert_eq!(o.duplicate(), None);
    }

    #[test]
    fn escaped_keys_are_decoded_so_a_duplicate_cannot_hide() {
        let body = br#"{"max_tokens":10,"max\u005ftokens":100000}"#;
        assert_eq!(top_object(body).unwrap().duplicate(), Some("max_tokens"));
    }

    #[test]
    fn edits_change_only_their_bytes() {
        let body = br#"{"a":1.50,"max_tokens":128000,"z":true}"#;
        let o = top_object(body).unwrap();
        let out = apply(
            body,
            vec![
                Edit {
                    range: o.get("max_tokens").unwrap().value.clone(),
                    bytes: b"2048".to_vec(),
                },
                Edit {
                    range: 1..1,
                    bytes: b"\"stream_options\":{\"include_usage\":true},".to_vec(),
                },
            ],
        );
        assert_eq!(
            out,
            br#"{"stream_options":{"include_usage":true},"a":1.50,"max_tokens":2048,"z":true}"#
        );
    }

    #[test]
    fn malformed_input_is_an_error_never_a_panic() {
        for bad in [
            &b""[..],
            b"[]",
            b"{",
            b"{\"a\"",
            b"{\"a\":",
            b"{\"a\":1",
            b"{\"a\":1,}x",
            b"{\"a\":\"\\",
            b"{\"a\":[}",
            b"{} x",
        ] {
            assert!(
                top_object(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for cut in 0..40 {
            let body = br#"{"model":"m","x":[{"y":"}"}],"n":2}"#;
            let _ = top_object(&body[..cut.min(body.len())]);
        }
    }
}
