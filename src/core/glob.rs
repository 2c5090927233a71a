//! Endpoint patterns: `*` matches any run of characters (slashes included); a leading
//! `https://` or `http://` is ignored; the host part is compared case-insensitively.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    source: String,
    /// Literal pieces between the stars.
    pieces: Vec<String>,
    starts_with_star: bool,
    ends_with_star: bool,
}

impl Glob {
    /// Compiles a pattern. Errors name what is wrong, for the configuration log line.
    pub fn new(pattern: &str) -> Result<Glob, String> {
        let trimmed = pattern
            .strip_prefix("https://")
            .or_else(|| pattern.strip_prefix("http://"))
            .unwrap_or(pattern);
        if trimmed.is_empty() {
            return Err("empty pattern".to_string());
        }
        if trimmed.bytes().any(|b| b <= b' ' || b >= 0x7f) {
            return Err(format!(
                "pattern {pattern:?} has spaces or non-ASCII characters"
            ));
        }
        if trimmed.contains('?') {
            return Err(format!(
                "pattern {pattern:?} has a query: endpoints have none"
            ));
        }
        if trimmed.contains('%') {
            return Err(format!(
                "pattern {pattern:?} has a percent-escape: endpoints are decoded, write the characters"
            ));
        }
        let host = trimmed.split('/').next().unwrap_or("");
        if host.contains(':') && !host.starts_with('[') {
            return Err(format!(
                "pattern {pattern:?} has a port: endpoints have none"
            ));
        }
        // Lowercase the host part (up to the first '/'), keep the path as written.
        let normalized = match trimmed.find('/') {
            Some(i) => format!("{}{}", trimmed[..i].to_ascii_lowercase(), &trimmed[i..]),
            None => trimmed.to_ascii_lowercase(),
        };
        let pieces = normalized
            .split('*')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        Ok(Glob {
            source: pattern.to_string(),
            pieces,
            starts_with_star: normalized.starts_with('*'),
            ends_with_star: normalized.ends_with('*'),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Number of literal characters: more means more specific.
    pub fn literal_len(&self) -> usize {
        self.pieces.iter().map(String::len).sum()
    }

    pub fn matches(&self, text: &str) -> bool {
        let mut rest = text;
        let last = self.pieces.len();
        for (i, piece) in self.pieces.iter().enumerate() {
            let first = i == 0;
            let is_last = i + 1 == last;
            if first && !self.starts_with_star {
                match rest.strip_prefix(piece.as_str()) {
                    Some(r) => rest = r,
                    None => return false,
                }
                if is_last && !self.ends_with_star {
                    return rest.is_empty();
                }
                continue;
            }
            if is_last && !self.ends_with_star {
                return rest.ends_with(piece.as_str());
            }
            match rest.find(piece.as_str()) {
                Some(at) => rest = &rest[at + piece.len()..],
                None => return false,
            }
        }
        // No pieces left: either all were matched with a trailing star, or the
        // pattern was only stars, or it was empty of pieces and must match empty.
        self.ends_with_star || self.starts_with_star && self.pieces.is_empty() || rest.is_empty()
    }
}

/// True when any glob in the list matches.
pub fn any_match(globs: &[Glob], text: &str) -> bool {
    globs.iter().any(|g| g.matches(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, t: &str) -> bool {
        Glob::new(p).unwrap().matches(t)
    }

    #[test]
    fn stars_match_any_run() {
        assert!(m("api.openai.com/*", "api.openai.com/v1/chat/completions"));
        assert!(m("api.openai.com/*", "api.openai.com/"));
        assert!(!m("api.openai.com/*", "api.openai.com.evil.io/x"));
        assert!(m("*.tavily.com/search", "api.tavily.com/search"));
        assert!(!m("*.tavily.com/search", "api.tavily.com/search/x"));
        assert!(m("*", "anything/at/all"));
        assert!(m("api.*.com/*search*", "api.exa.ai.com/v1/search/x"));
        assert!(m("a*a", "aa"));
        assert!(!m("a*a", "a"));
        assert!(m("exact.com/path", "exact.com/path"));
        assert!(!m("exact.com/path", "exact.com/path2"));
    }

    #[test]
    fn scheme_ignored_host_case_insensitive() {
        assert!(m("https://API.OpenAI.com/*", "api.openai.com/v1/x"));
        assert!(m(
            "http://api.deepl.com/v2/translate",
            "api.deepl.com/v2/translate"
        ));
        assert!(!m("api.x.com/V1", "api.x.com/v1"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(Glob::new("").is_err());
        assert!(Glob::new("https://").is_err());
        assert!(Glob::new("a b").is_err());
        assert!(Glob::new("a.com/x?y=1").is_err());
        assert!(Glob::new("api.openai.com:443/*").is_err());
        assert!(Glob::new("a.com/%69mages").is_err());
    }
}
