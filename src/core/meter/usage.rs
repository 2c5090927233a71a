//! A metered call's answer: the usage, read from the JSON answer at its end or from
//! the SSE stream event by event as it passes, and what it costs.

use serde_json::Value;

use crate::core::amount::Amount;
use crate::core::ledger::report::Tokens;
use crate::core::meter::request::Api;
use crate::core::meter::sse::{SseEvent, SseReader};
use crate::core::meter::{cost_of, Rates};

/// Tokens as the APIs bill them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Input tokens billed at the input rate (not cache writes or reads).
    pub input: u64,
    pub output: u64,
    pub cache_write_5m: u64,
    pub cache_write_1h: u64,
    pub cache_read: u64,
}

impl Usage {
    pub fn cost(&self, rates: &Rates) -> Amount {
        cost_of(&[
            (self.input, rates.input),
            (self.output, rates.output),
            (self.cache_write_5m, rates.cache_write_5m),
            (self.cache_write_1h, rates.cache_write_1h),
            (self.cache_read, rates.cache_read),
        ])
    }

    pub fn tokens(&self) -> Tokens {
        Tokens {
            input: self.input,
            output: self.output,
            cache_write: self.cache_write_5m.saturating_add(self.cache_write_1h),
            cache_read: self.cache_read,
        }
    }
}

/// How the answer ended, for the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metered {
    /// The usage came: the call costs this.
    Usage(Usage),
    /// It never came (the stream was cut, an error event, an answer pag0 cannot read):
    /// the call is charged its reservation and counted unmetered.
    Unmetered,
}

/// The longest SSE event kept to read usage from (content deltas past it are cut,
/// which loses nothing: usage events are small).
const MAX_EVENT_BYTES: usize = 64 * 1024;
/// The longest JSON answer read for its usage (LLM answers are far smaller).
pub const MAX_JSON_ANSWER: usize = 8 * 1024 * 1024;

fn count(v: Option<&Value>) -> Option<u64> {
    v.and_then(Value::as_u64)
}

/// Reads a metered answer as it passes.
#[derive(Debug)]
pub struct AnswerMeter {
    api: Api,
    streaming: bool,
    sse: SseReader,
    json: Vec<u8>,
    json_overflow: bool,
    events: EventUsage,
}

/// What a stream's events said about its usage so far.
#[derive(Debug, Default)]
struct EventUsage {
    /// Anthropic: usage fields as they stand (each delta overwrites what it carries).
    fields: AnthropicFields,
    /// The final usage was seen (message_delta, the usage chunk, response.completed).
    done: Option<Usage>,
    /// An error event came: whatever usage there is, the outcome is not known.
    failed: bool,
    /// The stream's last word came (`message_stop`, the usage chunk, the Responses
    /// API's final event): nothing billed can follow.
    complete: bool,
}

/// The events whose data can carry usage, per API; the reader keeps no other data.
fn messages_usage_event(name: &[u8]) -> bool {
    matches!(name, b"message_start" | b"message_delta")
}

fn responses_usage_event(name: &[u8]) -> bool {
    matches!(name, b"response.completed" | b"response.incomplete")
}

fn any_event(_: &[u8]) -> bool {
    true
}

/// Where `needle` starts in `hay`: candidates by its first byte (memchr), then compared.
/// The events searched are small; this keeps memchr's substring search out of the module.
fn positions<'a>(hay: &'a [u8], needle: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    let first = needle.first().copied().unwrap_or(0);
    memchr::memchr_iter(first, hay).filter(move |&at| hay[at..].starts_with(needle))
}

/// `"usage":` followed by an object (Chat chunks carry `"usage":null` until the last).
fn has_usage_object(data: &[u8]) -> bool {
    let needle = b"\"usage\"";
    positions(data, needle).any(|at| {
        data[at + needle.len()..]
            .iter()
            .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b':'))
            == Some(&b'{')
    })
}

#[derive(Debug, Default, Clone, Copy)]
struct AnthropicFields {
    input: Option<u64>,
    output: Option<u64>,
    cache_creation: Option<u64>,
    cache_5m: Option<u64>,
    cache_1h: Option<u64>,
    cache_read: Option<u64>,
}

impl AnthropicFields {
    /// Overwrites the fields `usage` carries (Anthropic's usage is cumulative).
    fn update(&mut self, usage: &Value) {
        let set = |slot: &mut Option<u64>, v: Option<u64>| {
            if v.is_some() {
                *slot = v;
            }
        };
        set(&mut self.input, count(usage.get("input_tokens")));
        set(&mut self.output, count(usage.get("output_tokens")));
        set(
            &mut self.cache_creation,
            count(usage.get("cache_creation_input_tokens")),
        );
        set(
            &mut self.cache_read,
            count(usage.get("cache_read_input_tokens")),
        );
        if let Some(split) = usage.get("cache_creation") {
            set(
                &mut self.cache_5m,
                count(split.get("ephemeral_5m_input_tokens")),
            );
            set(
                &mut self.cache_1h,
                count(split.get("ephemeral_1h_input_tokens")),
            );
        }
    }

    fn usage(&self) -> Usage {
        // Without the TTL split every cache write is a 5-minute one; with it, what the
        // split does not account for too.
        let total = self.cache_creation.unwrap_or(0);
        let one_hour = self.cache_1h.unwrap_or(0);
        let five = self
            .cache_5m
            .unwrap_or(0)
            .max(total.saturating_sub(one_hour));
        Usage {
            input: self.input.unwrap_or(0),
            output: self.output.unwrap_or(0),
            cache_write_5m: five,
            cache_write_1h: one_hour,
            cache_read: self.cache_read.unwrap_or(0),
        }
    }
}

/// OpenAI's usage (Chat Completions or Responses): the prompt count includes the
/// cached tokens, which are billed at the cache-read rate.
fn openai_usage(usage: &Value) -> Option<Usage> {
    let prompt = count(usage.get("prompt_tokens")).or_else(|| count(usage.get("input_tokens")))?;
    let output =
        count(usage.get("completion_tokens")).or_else(|| count(usage.get("output_tokens")))?;
    let cached = usage
        .get("prompt_tokens_details")
        .or_else(|| usage.get("input_tokens_details"))
        .and_then(|d| count(d.get("cached_tokens")))
        .unwrap_or(0)
        .min(prompt);
    Some(Usage {
        input: prompt - cached,
        output,
        cache_read: cached,
        ..Usage::default()
    })
}

impl EventUsage {
    fn event(&mut self, api: Api, event: &SseEvent) {
        if event.truncated {
            return;
        }
        let name = event.name;
        if name == b"error" || (name == b"response.failed" && self.done.is_none()) {
            self.failed = true;
            return;
        }
        if name == b"message_stop" {
            self.complete = true;
        }
        match api {
            Api::Messages => {
                if !messages_usage_event(name) || positions(event.data, b"usage").next().is_none() {
                    return;
                }
                let Ok(doc) = serde_json::from_slice::<Value>(event.data) else {
                    return;
                };
                let usage = if name == b"message_start" {
                    doc.get("message").and_then(|m| m.get("usage"))
                } else {
                    doc.get("usage")
                };
                if let Some(usage) = usage {
                    self.fields.update(usage);
                    if name == b"message_delta" {
                        self.done = Some(self.fields.usage());
                    }
                }
            }
            Api::Chat => {
                if !has_usage_object(event.data) {
                    return;
                }
                if let Ok(doc) = serde_json::from_slice::<Value>(event.data) {
                    if let Some(usage) = doc.get("usage").and_then(openai_usage) {
                        self.done = Some(usage);
                        self.complete = true;
                    }
                }
            }
            Api::Responses => {
                if !responses_usage_event(name) {
                    return;
                }
                if let Ok(doc) = serde_json::from_slice::<Value>(event.data) {
                    if let Some(usage) = doc
                        .get("response")
                        .and_then(|r| r.get("usage"))
                        .and_then(openai_usage)
                    {
                        self.done = Some(usage);
                        self.complete = true;
                    }
                }
            }
        }
    }
}

impl AnswerMeter {
    /// `streaming`: the answer is an SSE stream (`text/event-stream`).
    pub fn new(api: Api, streaming: bool) -> AnswerMeter {
        AnswerMeter {
            api,
            streaming,
            sse: SseReader::keeping(
                MAX_EVENT_BYTES,
                match api {
                    Api::Messages => messages_usage_event,
                    Api::Responses => responses_usage_event,
                    Api::Chat => any_event,
                },
            ),
            json: Vec::new(),
            json_overflow: false,
            events: EventUsage::default(),
        }
    }

    pub fn streaming(&self) -> bool {
        self.streaming
    }

    /// A chunk of the answer's body, as it passes.
    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.streaming {
            if self.json.len().saturating_add(chunk.len()) > MAX_JSON_ANSWER {
                self.json_overflow = true;
                self.json = Vec::new();
            } else if !self.json_overflow {
                self.json.extend_from_slice(chunk);
            }
            return;
        }
        let (api, events) = (self.api, &mut self.events);
        self.sse.feed(chunk, &mut |e| events.event(api, &e));
    }

    /// The stream was cut before its end: its usage only if its last word came,
    /// else unmetered (more may have been billed than the usage seen so far).
    pub fn finish_cut(&mut self) -> Metered {
        if self.streaming && !self.events.complete {
            return Metered::Unmetered;
        }
        self.finish()
    }

    /// The answer ended (its last chunk was fed).
    pub fn finish(&mut self) -> Metered {
        if !self.streaming {
            if self.json_overflow {
                return Metered::Unmetered;
            }
            let Ok(doc) = serde_json::from_slice::<Value>(&self.json) else {
                return Metered::Unmetered;
            };
            let usage = match self.api {
                Api::Messages => doc.get("usage").map(|u| {
                    let mut f = AnthropicFields::default();
                    f.update(u);
                    f.usage()
                }),
                Api::Chat | Api::Responses => doc.get("usage").and_then(openai_usage),
            };
            return usage.map_or(Metered::Unmetered, Metered::Usage);
        }
        match (self.events.done, self.events.failed) {
            (Some(usage), false) => Metered::Usage(usage),
            _ => Metered::Unmetered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(api: Api, streaming: bool, answer: &str, chunk: usize) -> Metered {
        let mut m = AnswerMeter::new(api, streaming);
        for piece in answer.as_bytes().chunks(chunk.max(1)) {
            m.feed(piece);
        }
        m.finish()
    }

    const ANTHROPIC_STREAM: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":300,\"cache_read_input_tokens\":40,\"cache_creation\":{\"ephemeral_5m_input_tokens\":100,\"ephemeral_1h_input_tokens\":200},\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":12,\"output_tokens\":25}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    #[test]
    fn anthropic_streams_overwrite_cumulative_usage_whatever_the_chunking() {
        let expect = Metered::Usage(Usage {
            input: 12,
            output: 25,
            cache_write_5m: 100,
            cache_write_1h: 200,
            cache_read: 40,
        });
        for chunk in [1, 2, 3, 7, 64, 10_000] {
            assert_eq!(
                run(Api::Messages, true, ANTHROPIC_STREAM, chunk),
                expect,
                "{chunk}"
            );
        }
        // Cut before the final delta, or an error event: unmetered.
        let cut = &ANTHROPIC_STREAM[..ANTHROPIC_STREAM.find("event: message_delta").unwrap()];
        assert_eq!(run(Api::Messages, true, cut, 5), Metered::Unmetered);
        let failed = ANTHROPIC_STREAM.replace(
            "event: message_stop",
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\nevent: message_stop",
        );
        assert_eq!(run(Api::Messages, true, &failed, 9), Metered::Unmetered);
    }

    #[test]
    fn a_stream_cut_after_its_last_word_keeps_its_usage_and_before_it_does_not() {
        let mut m = AnswerMeter::new(Api::Messages, true);
        m.feed(ANTHROPIC_STREAM.as_bytes());
        assert!(matches!(m.finish_cut(), Metered::Usage(_)));
        let before_stop =
            &ANTHROPIC_STREAM[..ANTHROPIC_STREAM.find("event: message_stop").unwrap()];
        let mut m = AnswerMeter::new(Api::Messages, true);
        m.feed(before_stop.as_bytes());
        assert_eq!(m.finish_cut(), Metered::Unmetered);
    }

    #[test]
    fn cache_writes_without_the_ttl_split_are_five_minute_writes() {
        let body = r#"{"usage":{"input_tokens":5,"cache_creation_input_tokens":50,"cache_read_input_tokens":0,"output_tokens":3}}"#;
        assert_eq!(
            run(Api::Messages, false, body, 4),
            Metered::Usage(Usage {
                input: 5,
                output: 3,
                cache_write_5m: 50,
                ..Usage::default()
            })
        );
    }

    #[test]
    fn openai_prompt_counts_include_the_cached_tokens() {
        let chat = r#"{"usage":{"prompt_tokens":100,"completion_tokens":20,"prompt_tokens_details":{"cached_tokens":64},"completion_tokens_details":{"reasoning_tokens":10}}}"#;
        let expect = Metered::Usage(Usage {
            input: 36,
            output: 20,
            cache_read: 64,
            ..Usage::default()
        });
        assert_eq!(run(Api::Chat, false, chat, 3), expect);
        // Chunks say `"usage": null` until the last one carries the object.
        let stream = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"x\"}}}}],\"usage\": null}}\n\ndata: {{\"choices\":[],{}\n\ndata: [DONE]\n\n", &chat[1..]);
        assert_eq!(run(Api::Chat, true, &stream, 5), expect);
        let responses = "event: response.created\ndata: {\"response\":{}}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":100,\"input_tokens_details\":{\"cached_tokens\":64},\"output_tokens\":20}}}\n\n";
        assert_eq!(run(Api::Responses, true, responses, 11), expect);
        assert_eq!(
            run(Api::Chat, true, "data: {\"choices\":[]}\n\n", 3),
            Metered::Unmetered
        );
        assert_eq!(run(Api::Chat, false, "{not json", 3), Metered::Unmetered);
    }

    #[test]
    fn costs_price_each_kind_at_its_rate() {
        let rates = Rates {
            input: 3_000_000,
            output: 15_000_000,
            cache_write_5m: 3_750_000,
            cache_write_1h: 6_000_000,
            cache_read: 300_000,
        };
        let u = Usage {
            input: 12,
            output: 25,
            cache_write_5m: 100,
            cache_write_1h: 200,
            cache_read: 40,
        };
        let micro =
            12 * 3_000_000 + 25 * 15_000_000 + 100 * 3_750_000 + 200 * 6_000_000 + 40 * 300_000u64;
        assert_eq!(u.cost(&rates), micro.div_ceil(1_000_000));
    }
}
