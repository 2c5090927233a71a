//! Server-sent events put back together from body chunks as they pass: an event, or a
//! line, may be split across chunks at any byte. Only what an event needs is kept
//! (its name, and its data when the caller wants it); a data field past
//! `max_event_bytes` is dropped, and the event is then marked so, never buffered
//! without bound. Lines whole inside a chunk are read where they are (only a line cut
//! by the chunk's end is copied), and most events' data is never copied at all: a
//! stream of 1 MB in small events costs a scan for line ends, not copies.

/// One complete event, borrowed from the reader until the callback returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// `event:` (empty when the event has none: OpenAI's chat chunks).
    pub name: &'a [u8],
    /// `data:` lines joined with `\n`; empty when the reader was told to skip the data
    /// of events with this name.
    pub data: &'a [u8],
    /// The data was longer than the reader keeps: `data` is incomplete.
    pub truncated: bool,
}

#[derive(Debug)]
pub struct SseReader {
    /// The start of a line the previous chunk cut.
    line: Vec<u8>,
    name: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    truncated: bool,
    after_cr: bool,
    max_event_bytes: usize,
    /// Events whose name this accepts have their data kept; the others only their name.
    keeps_data: fn(&[u8]) -> bool,
}

fn any_event(_: &[u8]) -> bool {
    true
}

impl SseReader {
    pub fn new(max_event_bytes: usize) -> SseReader {
        SseReader::keeping(max_event_bytes, any_event)
    }

    /// A reader that keeps the data only of events whose name `keeps_data` accepts
    /// (an event without a name is checked with the empty name).
    pub fn keeping(max_event_bytes: usize, keeps_data: fn(&[u8]) -> bool) -> SseReader {
        SseReader {
            line: Vec::new(),
            name: Vec::new(),
            data: Vec::new(),
            has_data: false,
            truncated: false,
            after_cr: false,
            max_event_bytes,
            keeps_data,
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
        while let Some(end) = memchr::memchr2(b'\n', b'\r', rest) {
            let (head, tail) = rest.split_at(end);
            if self.line.is_empty() {
                self.line_done(head, on_event);
            } else {
                self.push_line_part(head);
                let line = std::mem::take(&mut self.line);
                self.line_done(&line, on_event);
                self.line = line;
                self.line.clear();
            }
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
                    name: &self.name,
                    data: &self.data,
                    truncated: self.truncated,
                });
            }
            self.name.clear();
            self.data.clear();
            self.has_data = false;
            self.truncated = false;
            return;
        }
        if line.first() == Some(&b':') {
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(at) => {
                let value = &line[at + 1..];
                (&line[..at], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => {
                self.name.clear();
                self.name.extend_from_slice(value);
            }
            b"data" => {
                if self.has_data {
                    if (self.keeps_data)(&self.name) {
                        self.data.push(b'\n');
                    }
                } else if self.data.capacity() > 4 * self.max_event_bytes.min(65_536) {
                    // One long event must not keep its buffer for the rest of the stream.
                    self.data = Vec::new();
                }
                self.has_data = true;
                if !(self.keeps_data)(&self.name) {
                    return;
                }
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

    /// An event, owned, for comparisons.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Owned {
        name: String,
        data: Vec<u8>,
        truncated: bool,
    }

    fn own(e: SseEvent) -> Owned {
        Owned {
            name: String::from_utf8_lossy(e.name).into_owned(),
            data: e.data.to_vec(),
            truncated: e.truncated,
        }
    }

    fn events(stream: &[u8], cuts: &[usize]) -> Vec<Owned> {
        let mut reader = SseReader::new(1024);
        let mut out = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
            let cut = cut.clamp(at, stream.len());
            reader.feed(&stream[at..cut], &mut |e| out.push(own(e)));
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
                Owned {
                    name: "message_start".into(),
                    data: b"{\"a\":1}".to_vec(),
                    truncated: false
                },
                Owned {
                    name: "message_delta".into(),
                    data: b"{\"b\":\n2}".to_vec(),
                    truncated: false
                },
                Owned {
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
        reader.feed(b"event: e\ndata: ", &mut |e| out.push(own(e)));
        for chunk in big.chunks(7) {
            reader.feed(chunk, &mut |e| out.push(own(e)));
        }
        reader.feed(b"\n\ndata: ok\n\n", &mut |e| out.push(own(e)));
        assert_eq!(out.len(), 2);
        assert!(out[0].truncated && out[0].data.len() <= 8);
        assert_eq!(
            (out[1].data.as_slice(), out[1].truncated),
            (&b"ok"[..], false)
        );
        assert!(reader.line.capacity() < 1024);
    }

    #[test]
    fn data_of_events_the_reader_skips_is_never_kept() {
        fn usage_events(name: &[u8]) -> bool {
            name == b"message_delta"
        }
        let mut reader = SseReader::keeping(1024, usage_events);
        let mut out = Vec::new();
        let stream = b"event: content_block_delta\ndata: {\"t\":\"x\"}\n\nevent: message_delta\ndata: {\"u\":1}\n\n";
        for a in 0..stream.len() {
            out.clear();
            reader.feed(&stream[..a], &mut |e| out.push(own(e)));
            reader.feed(&stream[a..], &mut |e| out.push(own(e)));
            assert_eq!(out.len(), 2, "cut at {a}");
            assert_eq!(
                (out[0].name.as_str(), out[0].data.len()),
                ("content_block_delta", 0)
            );
            assert_eq!(out[1].data, b"{\"u\":1}".to_vec());
        }
    }
}
