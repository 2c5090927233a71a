//! Server-sent events put back together from body chunks as they pass: an event, or a
//! line, may be split across chunks at any byte. Only what an event needs is kept
//! (its name and data); a data field past `max_event_bytes` is dropped, and the event
//! is then marked so, never buffered without bound.

/// One complete event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` (empty when the event has none: OpenAI's chat chunks).
    pub name: String,
    /// `data:` lines joined with `\n`.
    pub data: Vec<u8>,
    /// The data was longer than the reader keeps: `data` is incomplete.
    pub truncated: bool,
}

#[derive(Debug)]
pub struct SseReader {
    line: Vec<u8>,
    name: String,
    data: Vec<u8>,
    has_data: bool,
    truncated: bool,
    after_cr: bool,
    max_event_bytes: usize,
}

impl SseReader {
    pub fn new(max_event_bytes: usize) -> SseReader {
        SseReader {
            line: Vec::new(),
            name: String::new(),
            data: Vec::new(),
            has_data: false,
            truncated: false,
            after_cr: false,
            max_event_bytes,
        }
    }

    /// Reads a chunk; `on_event` gets every event it completes, in order.
    pub fn feed(&mut self, chunk: &[u8], on_event: &mut dyn FnMut(SseEvent)) {
        let mut rest = chunk;
        if self.after_cr && !rest.is_empty() {
            // A CRLF split between chunks: the LF ends nothing new.
            if let [b'\n', tail @ ..] = rest {
                rest = tail;
            }
            self.after_cr = false;
        }
        while let Some(end) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            let (head, tail) = rest.split_at(end);
            self.push_line_part(head);
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, on_event);
            self.line = line;
            self.line.clear();
            rest = match tail {
                [b'\r', b'\n', t @ ..] => t,
                [b'\r'] => {
                    self.after_cr = true;
                    &[]
                }
                [_, t @ ..] => t,
                [] => &[],
            };
        }
        self.push_line_part(rest);
    }

    fn push_line_part(&mut self, part: &[u8]) {
        // A line longer than an event may be is cut: only `data` can be that long, and
        // it is marked truncated below.
        let room = self
            .max_event_bytes
            .saturating_add(16)
            .saturating_sub(self.line.len());
        if part.len() > room {
            self.line.extend_from_slice(&part[..room]);
            self.truncated = true;
        } else {
            self.line.extend_from_slice(part);
        }
    }

    fn line_done(&mut self, line: &[u8], on_event: &mut dyn FnMut(SseEvent)) {
        if line.is_empty() {
            if self.has_data || !self.name.is_empty() {
                on_event(SseEvent {
                    name: std::mem::take(&mut self.name),
                    data: std::mem::take(&mut self.data),
                    truncated: self.truncated,
                });
            }
            self.has_data = false;
            self.truncated = false;
            return;
        }
        if line.first() == Some(&b':') {
            return;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(at) => {
                let value = &line[at + 1..];
                (&line[..at], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => self.name = String::from_utf8_lossy(value).into_owned(),
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.has_data = true;
                let room = self.max_event_bytes.saturating_sub(self.data.len());
                if value.len() > room {
                    self.data.extend_from_slice(&value[..room]);
                    self.truncated = true;
                } else {
                    self.data.extend_from_slice(value);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(stream: &[u8], cuts: &[usize]) -> Vec<SseEvent> {
        let mut reader = SseReader::new(1024);
        let mut out = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
            let cut = cut.clamp(at, stream.len());
            reader.feed(&stream[at..cut], &mut |e| out.push(e));
            at = cut;
        }
        out
    }

    #[test]
    fn events_split_at_any_byte_come_out_whole() {
        let stream = b"event: message_start\r\ndata: {\"a\":1}\r\n\r\n: ping\n\nevent: message_delta\ndata: {\"b\":\ndata: 2}\n\ndata: [DONE]\r\rdata: x";
        let whole = events(stream, &[]);
        assert_eq!(
            whole,
            vec![
                SseEvent {
                    name: "message_start".into(),
                    data: b"{\"a\":1}".to_vec(),
                    truncated: false
                },
                SseEvent {
                    name: "message_delta".into(),
                    data: b"{\"b\":\n2}".to_vec(),
                    truncated: false
                },
                SseEvent {
                    name: String::new(),
                    data: b"[DONE]".to_vec(),
                    truncated: false
                },
            ]
        );
        for a in 0..stream.len() {
            for b in a..stream.len() {
                assert_eq!(events(stream, &[a, b]), whole, "cuts at {a} and {b}");
            }
        }
    }

    #[test]
    fn long_data_is_cut_and_marked_never_kept_whole() {
        let mut reader = SseReader::new(8);
        let mut out = Vec::new();
        let big = vec![b'x'; 100_000];
        reader.feed(b"event: e\ndata: ", &mut |e| out.push(e));
        for chunk in big.chunks(7) {
            reader.feed(chunk, &mut |e| out.push(e));
        }
        reader.feed(b"\n\ndata: ok\n\n", &mut |e| out.push(e));
        assert_eq!(out.len(), 2);
        assert!(out[0].truncated && out[0].data.len() <= 8);
        assert_eq!(
            (out[1].data.as_slice(), out[1].truncated),
            (&b"ok"[..], false)
        );
        assert!(reader.line.capacity() < 1024);
    }
}
