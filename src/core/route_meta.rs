//! A route's `filter_metadata.pag0`, read in one property call. Envoy 1.40 hands the
//! map over in proxy-wasm's pairs encoding (measured: `u32` count, then each key's and
//! value's `u32` length, then each key and value followed by a NUL). Reading each field
//! with its own property call cost one host call (and an expression evaluation in
//! Envoy) per field on every request.

use crate::core::call::RouteSettings;
use crate::core::pairs::pairs;

/// What a value that is not text becomes: checking it fails closed (a price written as
/// a YAML number is a config error, never "no price").
pub const NOT_TEXT: &str = "<not text>";

/// Decodes the pairs into `RouteSettings`. An unknown key is kept (the first one) so
/// that the call fails closed: a misspelt `price` must not make a route free.
pub fn decode(bytes: &[u8]) -> Result<RouteSettings, String> {
    let mut settings = RouteSettings::default();
    for (name, value) in pairs(bytes)? {
        let slot = match name {
            b"policy" => &mut settings.policy,
            b"price" => &mut settings.price,
            b"tool" => &mut settings.tool,
            b"chargeOn" => &mut settings.charge_on,
            b"endpoint" => &mut settings.endpoint,
            b"cacheTTL" => &mut settings.cache_ttl,
            b"x402" => &mut settings.x402,
            b"meter" => &mut settings.meter,
            b"defaultSession" => &mut settings.default_session,
            _ => {
                if settings.unknown.is_none() {
                    settings.unknown =
                        Some(String::from_utf8_lossy(name).chars().take(64).collect());
                }
                continue;
            }
        };
        *slot =
            Some(std::str::from_utf8(value).map_or_else(|_| NOT_TEXT.to_string(), str::to_string));
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            out.extend((k.len() as u32).to_le_bytes());
            out.extend((v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend_from_slice(k);
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out
    }

    #[test]
    fn reads_what_envoy_sent_for_a_reference_route() {
        // Bytes logged from Envoy 1.40 for the Tavily search route of envoy/reference.yaml.
        let mut bytes = vec![
            3, 0, 0, 0, 5, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0, 21, 0, 0, 0, 4, 0, 0, 0, 6, 0, 0, 0,
        ];
        bytes.extend_from_slice(
            b"price\x0020000\x00endpoint\x00api.tavily.com/search\x00tool\x00search\x00",
        );
        let s = decode(&bytes).unwrap();
        assert_eq!(s.price.as_deref(), Some("20000"));
        assert_eq!(s.endpoint.as_deref(), Some("api.tavily.com/search"));
        assert_eq!(s.tool.as_deref(), Some("search"));
        assert_eq!((s.policy, s.charge_on, s.cache_ttl), (None, None, None));
    }

    #[test]
    fn values_that_are_not_text_and_unknown_keys_fail_closed() {
        let number = 20000f64.to_le_bytes();
        let bytes = encode(&[(b"price", &number), (b"prcie", b"x"), (b"policy", b"p")]);
        let s = decode(&bytes).unwrap();
        assert_eq!(s.price.as_deref(), Some(NOT_TEXT));
        assert_eq!(s.policy.as_deref(), Some("p"));
        assert_eq!(s.unknown.as_deref(), Some("prcie"));
        assert_eq!(decode(&[]).unwrap(), RouteSettings::default());
    }

    #[test]
    fn truncated_or_garbage_input_is_an_error_not_a_panic() {
        let good = encode(&[(b"price", b"20000"), (b"tool", b"search")]);
        for cut in 1..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode(&[0xff, 0xff, 0xff, 0xff]).is_err());
        let mut no_nul = good.clone();
        let last = no_nul.len() - 1;
        no_nul[last] = b'x';
        assert!(decode(&no_nul).is_err());
    }
}
