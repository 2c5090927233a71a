//! LLM calls metered by their tokens (route metadata `meter: anthropic | openai`):
//! before the call, an upper bound of its cost from the request body, lowered to what
//! the budget affords by lowering the output limit ([`request`]); after it, the real
//! cost from the usage in the answer, read from JSON or from the SSE stream as it
//! passes ([`usage`], [`sse`]). Prices come from the configuration's `llm.prices`.

pub mod json_scan;
pub mod request;
pub mod sse;
pub mod usage;

use crate::core::amount::Amount;
use crate::core::glob::Glob;

/// Rates per million tokens, in the budget's smallest unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rates {
    pub input: Amount,
    pub output: Amount,
    pub cache_write_5m: Amount,
    pub cache_write_1h: Amount,
    pub cache_read: Amount,
}

impl Rates {
    /// The rate any input token may be billed at (it may be a cache write).
    pub fn highest_input(&self) -> Amount {
        self.input
            .max(self.cache_write_5m)
            .max(self.cache_write_1h)
            .max(self.cache_read)
    }

    /// Each kind's highest rate over a table.
    fn max(&self, other: &Rates) -> Rates {
        Rates {
            input: self.input.max(other.input),
            output: self.output.max(other.output),
            cache_write_5m: self.cache_write_5m.max(other.cache_write_5m),
            cache_write_1h: self.cache_write_1h.max(other.cache_write_1h),
            cache_read: self.cache_read.max(other.cache_read),
        }
    }
}

/// What a model not in the table costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownModels {
    /// 403 MODEL_NOT_PRICED.
    Refuse,
    /// The table's highest rate of each kind.
    HighestRates,
}

/// The `llm` block of the configuration.
#[derive(Debug, Clone)]
pub struct LlmSettings {
    /// Model glob → rates; the most specific pattern (most literal characters) wins.
    pub prices: Vec<(Glob, Rates)>,
    pub unknown_models: UnknownModels,
    pub default_max_tokens: u64,
    pub min_output_tokens: u64,
    pub max_body_bytes: usize,
    pub image_tokens: u64,
    pub document_tokens: u64,
    pub server_tool_tokens: u64,
}

pub const DEFAULT_MAX_TOKENS: u64 = 4096;
pub const DEFAULT_MIN_OUTPUT_TOKENS: u64 = 1024;
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
pub const DEFAULT_IMAGE_TOKENS: u64 = 2000;
pub const DEFAULT_DOCUMENT_TOKENS: u64 = 100_000;
pub const DEFAULT_SERVER_TOOL_TOKENS: u64 = 100_000;
/// What the API adds to the input itself (the tool-use system prompt is a few hundred
/// tokens).
pub const API_OVERHEAD_TOKENS: u64 = 1000;
/// The largest output limit pag0 accepts in a request.
pub const MAX_OUTPUT_TOKENS: u64 = 1_000_000;

impl Default for LlmSettings {
    fn default() -> LlmSettings {
        LlmSettings {
            prices: Vec::new(),
            unknown_models: UnknownModels::Refuse,
            default_max_tokens: DEFAULT_MAX_TOKENS,
            min_output_tokens: DEFAULT_MIN_OUTPUT_TOKENS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            image_tokens: DEFAULT_IMAGE_TOKENS,
            document_tokens: DEFAULT_DOCUMENT_TOKENS,
            server_tool_tokens: DEFAULT_SERVER_TOOL_TOKENS,
        }
    }
}

impl LlmSettings {
    /// The rates of a model: the most specific matching pattern's, else (when the
    /// configuration says so) the table's highest; `None`: the model is not priced.
    pub fn rates(&self, model: &str) -> Option<Rates> {
        let found = self
            .prices
            .iter()
            .filter(|(glob, _)| glob.matches(model))
            .max_by_key(|(glob, _)| glob.literal_len())
            .map(|(_, rates)| *rates);
        match (found, self.unknown_models) {
            (Some(rates), _) => Some(rates),
            (None, UnknownModels::Refuse) => None,
            (None, UnknownModels::HighestRates) => {
                self.prices.iter().map(|(_, r)| *r).reduce(|a, b| a.max(&b))
            }
        }
    }
}

/// Tokens × rate per million, summed, in the budget's unit, rounded up.
pub fn cost_of(parts: &[(u64, Amount)]) -> Amount {
    let micro = parts.iter().fold(0u128, |sum, (tokens, rate)| {
        sum.saturating_add(u128::from(*tokens) * u128::from(*rate))
    });
    Amount::try_from(micro.div_ceil(1_000_000)).unwrap_or(Amount::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(input: u64, output: u64) -> Rates {
        Rates {
            input,
            output,
            cache_write_5m: input + input / 4,
            cache_write_1h: input * 2,
            cache_read: input / 10,
        }
    }

    #[test]
    fn the_most_specific_pattern_prices_a_model_whatever_the_order() {
        let settings = LlmSettings {
            prices: vec![
                (Glob::new("claude-opus-4*").unwrap(), rates(15, 75)),
                (Glob::new("claude-opus-4-5*").unwrap(), rates(5, 25)),
                (Glob::new("gpt-5").unwrap(), rates(1, 10)),
            ],
            ..LlmSettings::default()
        };
        assert_eq!(
            settings.rates("claude-opus-4-5-20251101"),
            Some(rates(5, 25))
        );
        assert_eq!(settings.rates("claude-opus-4-1"), Some(rates(15, 75)));
        assert_eq!(settings.rates("gpt-5.5"), None);
        let highest = LlmSettings {
            unknown_models: UnknownModels::HighestRates,
            ..settings
        };
        assert_eq!(highest.rates("gpt-5.5"), Some(rates(15, 75)));
    }

    #[test]
    fn costs_round_up_and_never_overflow() {
        assert_eq!(cost_of(&[(1, 1)]), 1);
        assert_eq!(cost_of(&[(1_000_000, 3_000_000)]), 3_000_000);
        assert_eq!(cost_of(&[(333_333, 3), (1, 0)]), 1);
        assert_eq!(
            cost_of(&[(u64::MAX, u64::MAX), (u64::MAX, u64::MAX)]),
            Amount::MAX
        );
        assert_eq!(rates(3, 15).highest_input(), 6);
    }
}
