//! A metered call's request: what it asks for (model, output limit, stream), the upper
//! bound of what it can cost, the output limit a budget affords, and the body with that
//! limit written in (only the fields pag0 sets change; every other byte passes as the
//! client wrote it).

use serde_json::Value;

use crate::core::amount::Amount;
use crate::core::call::MeterKind;
use crate::core::errors::{ErrorCode, Refusal};
use crate::core::meter::json_scan::{self, Edit, Object};
use crate::core::meter::{cost_of, LlmSettings, Rates, API_OVERHEAD_TOKENS, MAX_OUTPUT_TOKENS};

/// Which API a metered request speaks, by its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// Anthropic Messages (`/v1/messages`).
    Messages,
    /// OpenAI Chat Completions (`/v1/chat/completions`).
    Chat,
    /// OpenAI Responses (`/v1/responses`).
    Responses,
}

impl Api {
    /// The API of a metered route's path (query dropped); `None`: a path the meter does
    /// not price (token counting, model lists): such a call is priced as the route
    /// would be without `meter`.
    pub fn for_path(kind: MeterKind, path: &str) -> Option<Api> {
        let path = path.split('?').next().unwrap_or("").trim_end_matches('/');
        match kind {
            MeterKind::Anthropic if path.ends_with("/messages") => Some(Api::Messages),
            MeterKind::OpenAi if path.ends_with("/chat/completions") => Some(Api::Chat),
            MeterKind::OpenAi if path.ends_with("/responses") => Some(Api::Responses),
            _ => None,
        }
    }

    /// The body field that limits output tokens.
    fn limit_field(self) -> &'static str {
        match self {
            Api::Messages => "max_tokens",
            Api::Chat => "max_completion_tokens",
            Api::Responses => "max_output_tokens",
        }
    }
}

/// A metered request, read from its body.
#[derive(Debug, Clone)]
pub struct LlmRequest {
    pub api: Api,
    pub model: String,
    pub rates: Rates,
    pub stream: bool,
    /// The output limit the client set (`None`: pag0 writes the default).
    pub asked_max: Option<u64>,
    /// Choices (Chat Completions' `n`): each is billed.
    pub n: u64,
    /// Input tokens the call cannot exceed (see [`input_bound`]).
    pub input_bound: u64,
    /// Anthropic extended thinking's `budget_tokens`, which must stay below `max_tokens`.
    pub thinking_budget: Option<u64>,
    top: Object,
    /// Where the limit is written: the field the client used (Chat: `max_tokens` when it
    /// sent that and not `max_completion_tokens`).
    limit_key: &'static str,
}

/// What the budget let the call have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The output limit the call goes upstream with.
    pub max_output: u64,
    /// Lower than the client asked (say so in `x-pag0-max-tokens`).
    pub lowered: bool,
    /// The upper bound of the call's cost at that limit: what is reserved.
    pub bound: Amount,
}

fn invalid(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::InvalidRequest, message)
}

/// Thinking needs `budget_tokens` of at least 1024 below `max_tokens`.
const MIN_THINKING_BUDGET: u64 = 1024;

fn whole(value: &Value, field: &str, min: u64, max: u64) -> Result<u64, Refusal> {
    value
        .as_u64()
        .filter(|v| (min..=max).contains(v))
        .ok_or_else(|| invalid(format!("{field} must be an integer from {min} to {max}")))
}

/// Reads a metered request body. Bad input is a 400 (413 for a body over
/// `llm.maxBodyBytes`), a model the table does not price a 403 `MODEL_NOT_PRICED`.
pub fn read(api: Api, body: &[u8], settings: &LlmSettings) -> Result<LlmRequest, Refusal> {
    if body.len() > settings.max_body_bytes {
        return Err(invalid(format!(
            "the request body ({} bytes) is over llm.maxBodyBytes ({}), the most pag0 reads to meter a call",
            body.len(),
            settings.max_body_bytes
        ))
        .with_status(413));
    }
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("the request body is not JSON: {e}")))?;
    let top = json_scan::top_object(body)
        .map_err(|_| invalid("the request body must be a JSON object"))?;
    if let Some(key) = top.duplicate() {
        return Err(invalid(format!(
            "the request body sets {key:?} twice (the API and pag0 could read different values)"
        )));
    }
    let model = match doc.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => return Err(invalid("model must be a non-empty string")),
        None => return Err(invalid("the request body has no model")),
    };
    let rates = settings.rates(&model).ok_or_else(|| {
        Refusal::new(
            ErrorCode::ModelNotPriced,
            format!("model {model:?} is not in the price table (llm.prices)"),
        )
        .with_fields(vec![("model", model.chars().take(128).collect())])
    })?;
    let stream = match doc.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("stream must be true or false")),
    };
    let mut limit_key = api.limit_field();
    let mut asked_max = None;
    let limit_keys: &[&'static str] = match api {
        Api::Chat => &["max_completion_tokens", "max_tokens"],
        Api::Messages => &["max_tokens"],
        Api::Responses => &["max_output_tokens"],
    };
    for key in limit_keys {
        match doc.get(*key) {
            None | Some(Value::Null) => {}
            Some(v) => {
                let v = whole(v, key, 1, MAX_OUTPUT_TOKENS)?;
                if asked_max.is_none() {
                    asked_max = Some(v);
                    limit_key = key;
                } else {
                    // Chat with both: the API takes the smaller? It refuses; so do we.
                    return Err(invalid("set max_completion_tokens or max_tokens, not both"));
                }
            }
        }
    }
    let n = match (api, doc.get("n")) {
        (Api::Chat, Some(v)) if !v.is_null() => whole(v, "n", 1, 128)?,
        _ => 1,
    };
    let thinking_budget = match doc.get("thinking").and_then(|t| t.get("budget_tokens")) {
        None | Some(Value::Null) => None,
        Some(v) => Some(whole(v, "thinking.budget_tokens", 0, MAX_OUTPUT_TOKENS)?),
    };
    Ok(LlmRequest {
        api,
        model,
        rates,
        stream,
        asked_max,
        n,
        input_bound: input_bound(&doc, body.len(), settings),
        thinking_budget,
        top,
        limit_key,
    })
}

/// Input tokens a request cannot exceed: its body's bytes (a tokenizer maps text to
/// tokens of at least one byte each, and the JSON around the text only adds bytes),
/// plus what the body only refers to (an image or document by URL or file id), plus
/// what server tools add to the input, plus what the API adds itself.
pub fn input_bound(doc: &Value, body_len: usize, settings: &LlmSettings) -> u64 {
    let mut counts = Referenced::default();
    walk(doc, &mut counts);
    let server_tools = server_tools(doc);
    (body_len as u64)
        .saturating_add(API_OVERHEAD_TOKENS)
        .saturating_add(counts.images.saturating_mul(settings.image_tokens))
        .saturating_add(counts.documents.saturating_mul(settings.document_tokens))
        .saturating_add(server_tools.saturating_mul(settings.server_tool_tokens))
}

#[derive(Default)]
struct Referenced {
    images: u64,
    documents: u64,
}

fn is_inline(url: Option<&Value>) -> bool {
    url.and_then(Value::as_str)
        .is_some_and(|u| u.starts_with("data:"))
}

fn walk(value: &Value, counts: &mut Referenced) {
    // serde_json refuses nesting past 128 levels, so this recursion is bounded.
    match value {
        Value::Array(items) => items.iter().for_each(|v| walk(v, counts)),
        Value::Object(map) => {
            let kind = map.get("type").and_then(Value::as_str).unwrap_or("");
            let source_kind = map
                .get("source")
                .and_then(|s| s.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let by_reference = matches!(source_kind, "url" | "file");
            match kind {
                // Anthropic: {"type": "image", "source": {"type": "url" | "file", ...}}
                "image" if by_reference => counts.images += 1,
                "document" if by_reference => counts.documents += 1,
                // OpenAI Chat: {"type": "image_url", "image_url": {"url": "https://…"}}
                "image_url" if !is_inline(map.get("image_url").and_then(|i| i.get("url"))) => {
                    counts.images += 1
                }
                // OpenAI Responses: {"type": "input_image", "image_url" | "file_id"}
                "input_image" if !is_inline(map.get("image_url")) => counts.images += 1,
                // OpenAI: {"type": "file", "file": {"file_id"}} / {"type": "input_file"}
                "file" if map.get("file").and_then(|f| f.get("file_id")).is_some() => {
                    counts.documents += 1
                }
                "input_file" if map.contains_key("file_id") || map.contains_key("file_url") => {
                    counts.documents += 1
                }
                _ => {}
            }
            map.values().for_each(|v| walk(v, counts));
        }
        _ => {}
    }
}

/// Tools the API runs itself and whose results it adds to the input: Anthropic's web
/// search, web fetch and code execution (and MCP servers), OpenAI's hosted tools.
fn server_tools(doc: &Value) -> u64 {
    let hosted = |kind: &str| {
        [
            "web_search",
            "web_fetch",
            "code_execution",
            "code_interpreter",
            "file_search",
            "mcp",
            "image_generation",
            "computer_use_preview",
        ]
        .iter()
        .any(|p| kind.starts_with(p))
    };
    let tools = doc
        .get("tools")
        .and_then(Value::as_array)
        .map_or(0, |tools| {
            tools
                .iter()
                .filter(|t| t.get("type").and_then(Value::as_str).is_some_and(hosted))
                .count()
        });
    let mcp_servers = doc
        .get("mcp_servers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let chat_search = usize::from(doc.get("web_search_options").is_some());
    (tools + mcp_servers + chat_search) as u64
}

impl LlmRequest {
    /// The output limit the call asks for (the default when it sets none).
    pub fn asked_output(&self, settings: &LlmSettings) -> u64 {
        self.asked_max.unwrap_or(settings.default_max_tokens)
    }

    /// The upper bound of the call's cost with this output limit.
    pub fn bound(&self, max_output: u64) -> Amount {
        cost_of(&[
            (self.input_bound, self.rates.highest_input()),
            (max_output.saturating_mul(self.n), self.rates.output),
        ])
    }

    /// The least output limit pag0 lowers a call to: `minOutputTokens`, or what the
    /// client asked if less; with extended thinking, more than its 1024-token minimum.
    pub fn min_output(&self, settings: &LlmSettings) -> u64 {
        let floor = settings
            .min_output_tokens
            .min(self.asked_output(settings))
            .max(1);
        match self.thinking_budget {
            Some(_) => floor.max(MIN_THINKING_BUDGET + 1),
            None => floor,
        }
    }

    /// The largest output limit (at most what was asked) whose bound fits in `amount`;
    /// `None` when not even [`LlmRequest::min_output`] does.
    pub fn plan(&self, settings: &LlmSettings, amount: Amount) -> Option<Plan> {
        let asked = self.asked_output(settings);
        let min = self.min_output(settings);
        if self.bound(asked) <= amount {
            return Some(Plan {
                max_output: asked,
                lowered: false,
                bound: self.bound(asked),
            });
        }
        // Tokens the amount pays for after the input side, per choice.
        let input = u128::from(self.input_bound) * u128::from(self.rates.highest_input());
        let budget = u128::from(amount) * 1_000_000;
        let per_token = u128::from(self.rates.output) * u128::from(self.n);
        let affordable = budget
            .saturating_sub(input)
            .checked_div(per_token)
            .unwrap_or(u128::from(asked));
        let max_output = u64::try_from(affordable).unwrap_or(u64::MAX).min(asked);
        if max_output < min || self.bound(max_output) > amount {
            return None;
        }
        Some(Plan {
            max_output,
            lowered: max_output < asked,
            bound: self.bound(max_output),
        })
    }

    /// The body to send upstream: with the planned output limit written in (when it is
    /// not what the client sent), `thinking.budget_tokens` kept below it, and, for a
    /// streamed Chat Completions call, `stream_options.include_usage` set so that the
    /// usage comes. `None`: the body goes as it came.
    pub fn rewrite(&self, body: &[u8], plan: &Plan) -> Option<Vec<u8>> {
        let mut edits = Vec::new();
        if self.asked_max != Some(plan.max_output) {
            edits.push(set_field(
                &self.top,
                self.limit_key,
                plan.max_output.to_string().as_bytes(),
            ));
        }
        if let (Some(budget), Some(field)) = (self.thinking_budget, self.top.get("thinking")) {
            if budget >= plan.max_output {
                if let Ok(thinking) = json_scan::object_at(body, field.value.start) {
                    let lowered = plan.max_output.saturating_sub(1).to_string();
                    edits.push(set_field(&thinking, "budget_tokens", lowered.as_bytes()));
                }
            }
        }
        if self.api == Api::Chat && self.stream && !self.asks_usage(body) {
            match self.top.get("stream_options") {
                Some(field) => match json_scan::object_at(body, field.value.start) {
                    Ok(options) => edits.push(set_field(&options, "include_usage", b"true")),
                    // `stream_options: null`: replace it.
                    Err(_) => edits.push(Edit {
                        range: field.value.clone(),
                        bytes: br#"{"include_usage":true}"#.to_vec(),
                    }),
                },
                None => edits.push(set_field(
                    &self.top,
                    "stream_options",
                    br#"{"include_usage":true}"#,
                )),
            }
        }
        if edits.is_empty() {
            None
        } else {
            Some(json_scan::apply(body, edits))
        }
    }

    fn asks_usage(&self, body: &[u8]) -> bool {
        self.top
            .get("stream_options")
            .and_then(|f| json_scan::object_at(body, f.value.start).ok())
            .and_then(|o| {
                o.get("include_usage")
                    .map(|f| body.get(f.value.clone()) == Some(b"true"))
            })
            .unwrap_or(false)
    }
}

/// Sets `key` in `object` to `value`: its value replaced where it is, else the field
/// added first.
fn set_field(object: &Object, key: &str, value: &[u8]) -> Edit {
    match object.get(key) {
        Some(field) => Edit {
            range: field.value.clone(),
            bytes: value.to_vec(),
        },
        None => {
            let (at, comma) = object.insert_at();
            let mut bytes = Vec::with_capacity(key.len() + value.len() + 4);
            bytes.push(b'"');
            bytes.extend_from_slice(key.as_bytes());
            bytes.extend_from_slice(b"\":");
            bytes.extend_from_slice(value);
            if comma {
                bytes.push(b',');
            }
            Edit {
                range: at..at,
                bytes,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::glob::Glob;

    fn settings() -> LlmSettings {
        LlmSettings {
            prices: vec![
                (
                    Glob::new("claude-sonnet-4-5*").unwrap(),
                    Rates {
                        input: 3_000_000,
                        output: 15_000_000,
                        cache_write_5m: 3_750_000,
                        cache_write_1h: 6_000_000,
                        cache_read: 300_000,
                    },
                ),
                (
                    Glob::new("gpt-4o-mini").unwrap(),
                    Rates {
                        input: 150_000,
                        output: 600_000,
                        cache_write_5m: 150_000,
                        cache_write_1h: 150_000,
                        cache_read: 75_000,
                    },
                ),
            ],
            ..LlmSettings::default()
        }
    }

    fn req(api: Api, body: &str) -> Result<LlmRequest, Refusal> {
        read(api, body.as_bytes(), &settings())
    }

    #[test]
    fn the_bound_is_bytes_plus_overhead_at_the_highest_input_rate_plus_the_output_limit() {
        let body = r#"{"model":"claude-sonnet-4-5","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#;
        let r = req(Api::Messages, body).unwrap();
        assert_eq!(r.input_bound, body.len() as u64 + 1000);
        // (bytes + 1000) × $6/M (1h cache write) + 1000 × $15/M, rounded up
        let expect =
            ((body.len() as u128 + 1000) * 6_000_000 + 1000 * 15_000_000).div_ceil(1_000_000);
        assert_eq!(u128::from(r.bound(1000)), expect);
        let plan = r.plan(&settings(), u64::MAX).unwrap();
        assert_eq!((plan.max_output, plan.lowered), (1000, false));
        assert_eq!(r.rewrite(body.as_bytes(), &plan), None);
    }

    #[test]
    fn images_and_documents_by_reference_and_server_tools_raise_the_bound() {
        let body = r#"{"model":"claude-sonnet-4-5","max_tokens":10,
            "tools":[{"type":"web_search_20250305","name":"web_search"},{"name":"mine","input_schema":{}}],
            "messages":[{"role":"user","content":[
              {"type":"image","source":{"type":"url","url":"https://x/a.png"}},
              {"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}},
              {"type":"document","source":{"type":"file","file_id":"f1"}}]}]}"#;
        let r = req(Api::Messages, body).unwrap();
        let s = settings();
        assert_eq!(
            r.input_bound,
            body.len() as u64 + 1000 + s.image_tokens + s.document_tokens + s.server_tool_tokens
        );
    }

    #[test]
    fn a_budget_that_cannot_cover_the_bound_lowers_the_limit_in_the_body() {
        let body = r#"{"model":"claude-sonnet-4-5","max_tokens":128000,"stream":true,"thinking":{"type":"enabled","budget_tokens":100000},"messages":[]}"#;
        let r = req(Api::Messages, body).unwrap();
        let s = settings();
        let amount = r.bound(5000) + 7; // a little more than 5000 tokens' worth
        let plan = r.plan(&s, amount).unwrap();
        assert_eq!((plan.max_output, plan.lowered), (5000, true));
        assert!(plan.bound <= amount);
        let out = String::from_utf8(r.rewrite(body.as_bytes(), &plan).unwrap()).unwrap();
        assert_eq!(
            out,
            r#"{"model":"claude-sonnet-4-5","max_tokens":5000,"stream":true,"thinking":{"type":"enabled","budget_tokens":4999},"messages":[]}"#
        );
        // Below minOutputTokens (or thinking's 1025): refused.
        assert_eq!(r.plan(&s, r.bound(1024)), None);
        assert!(r.plan(&s, r.bound(1025)).is_some());
    }

    #[test]
    fn chat_gets_a_default_limit_and_the_usage_of_its_stream() {
        let body = r#"{"model":"gpt-4o-mini","stream":true,"n":2,"messages":[]}"#;
        let r = req(Api::Chat, body).unwrap();
        assert_eq!((r.asked_max, r.n), (None, 2));
        let plan = r.plan(&settings(), u64::MAX).unwrap();
        assert_eq!((plan.max_output, plan.lowered), (4096, false));
        let out = String::from_utf8(r.rewrite(body.as_bytes(), &plan).unwrap()).unwrap();
        assert_eq!(
            out,
            r#"{"max_completion_tokens":4096,"stream_options":{"include_usage":true},"model":"gpt-4o-mini","stream":true,"n":2,"messages":[]}"#
        );
        // n choices are each billed.
        assert_eq!(
            r.bound(10),
            cost_of(&[(r.input_bound, 150_000), (20, 600_000)])
        );
        let asked = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":50,"stream_options":{"include_usage":false}}"#;
        let r = req(Api::Chat, asked).unwrap();
        let plan = r.plan(&settings(), u64::MAX).unwrap();
        assert_eq!(
            String::from_utf8(r.rewrite(asked.as_bytes(), &plan).unwrap()).unwrap(),
            r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":50,"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn bad_requests_are_clear_errors() {
        let code = |api, body: &str| req(api, body).unwrap_err().code;
        let status = |body: &str| req(Api::Messages, body).unwrap_err().status();
        assert_eq!(code(Api::Messages, "not json"), ErrorCode::InvalidRequest);
        assert_eq!(code(Api::Messages, "[1]"), ErrorCode::InvalidRequest);
        assert_eq!(
            code(Api::Messages, r#"{"max_tokens":5}"#),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(Api::Messages, r#"{"model":5}"#),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(Api::Messages, r#"{"model":"gpt-9"}"#),
            ErrorCode::ModelNotPriced
        );
        for max in ["-1", "0", "1000001", "1.5", "\"10\"", "1e3"] {
            let body = format!(r#"{{"model":"claude-sonnet-4-5","max_tokens":{max}}}"#);
            assert_eq!(
                code(Api::Messages, &body),
                ErrorCode::InvalidRequest,
                "{max}"
            );
        }
        assert_eq!(
            code(
                Api::Messages,
                r#"{"model":"claude-sonnet-4-5","max_tokens":10,"max\u005ftokens":100000}"#
            ),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(
                Api::Chat,
                r#"{"model":"gpt-4o-mini","max_tokens":10,"max_completion_tokens":10}"#
            ),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(Api::Chat, r#"{"model":"gpt-4o-mini","n":0}"#),
            ErrorCode::InvalidRequest
        );
        let big = format!(
            r#"{{"model":"claude-sonnet-4-5","x":"{}"}}"#,
            "a".repeat(5 << 20)
        );
        assert_eq!(status(&big), 413);
    }

    #[test]
    fn paths_pick_the_api() {
        assert_eq!(
            Api::for_path(MeterKind::Anthropic, "/v1/messages?beta=true"),
            Some(Api::Messages)
        );
        assert_eq!(
            Api::for_path(MeterKind::Anthropic, "/v1/messages/count_tokens"),
            None
        );
        assert_eq!(
            Api::for_path(MeterKind::OpenAi, "/v1/chat/completions"),
            Some(Api::Chat)
        );
        assert_eq!(
            Api::for_path(MeterKind::OpenAi, "/v1/responses"),
            Some(Api::Responses)
        );
        assert_eq!(Api::for_path(MeterKind::OpenAi, "/v1/models"), None);
    }
}
