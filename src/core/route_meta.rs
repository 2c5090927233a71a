//! A route's `filter_metadata.pag0`, read in one property call. Envoy 1.40 hands the
//! map over in proxy-wasm's pairs encoding (measured: `u32` count, then each key's and
//! value's `u32` length, then each key and value followed by a NUL). Reading each field
//! with its own property call cost one host call (and an expression evaluation in
//! Envoy) per field on every request.

use crate::core::firewall::RouteSettings;

/// What a value that is not text becomes: checking it fails closed (a price written as
/// a YAML number is a config error, never "no price").
pub const NOT_TEXT: &str = "<not text>";

/// Decodes the pairs into `RouteSettings`. Unknown keys are ignored, as before.
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
            _ => continue,
        };
        *slot =
            Some(std::str::from_utf8(value).map_or_else(|_| NOT_TEXT.to_string(), str::to_string));
    }
    Ok(settings)
}

fn u32_at(bytes: &[u8], at: usize) -> Result<usize, String> {
    let end = at.checked_add(4).ok_or("truncated pairs")?;
    let word: [u8; 4] = bytes
        .get(at..end)
        .and_then(|b| b.try_into().ok())
        .ok_or("truncated pairs")?;
    usize::try_from(u32::from_le_bytes(word)).map_err(|_| "length too large".to_string())
}

/// One key and its value, as bytes.
type Pair<'a> = (&'a [u8], &'a [u8]);

/// proxy-wasm's map encoding, checked end to end (no slice past the input).
fn pairs(bytes: &[u8]) -> Result<Vec<Pair<'_>>, String> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let count = u32_at(bytes, 0)?;
    if count > bytes.len() / 8 {
        return Err(format!("{count} pairs cannot fit in {} bytes", bytes.len()));
    }
    let mut data = 4 + 8 * count;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let key_len = u32_at(bytes, 4 + 8 * i)?;
        let value_len = u32_at(bytes, 8 + 8 * i)?;
        let key = take(bytes, &mut data, key_len)?;
        let value = take(bytes, &mut data, value_len)?;
        out.push((key, value));
    }
    Ok(out)
}

/// `len` bytes at `at`, then the NUL that ends them.
fn take<'a>(bytes: &'a [u8], at: &mut usize, len: usize) -> Result<&'a [u8], String> {
    let end = at.checked_add(len).ok_or("length too large")?;
    let slice = bytes.get(*at..end).ok_or("truncated pairs")?;
    if bytes.get(end) != Some(&0) {
        return Err("pair not NUL-terminated".to_string());
    }
    *at = end + 1;
    Ok(slice)
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
    fn values_that_are_not_text_fail_closed_and_unknown_keys_are_ignored() {
        let number = 20000f64.to_le_bytes();
        let bytes = encode(&[(b"price", &number), (b"other", b"x"), (b"policy", b"p")]);
        let s = decode(&bytes).unwrap();
        assert_eq!(s.price.as_deref(), Some(NOT_TEXT));
        assert_eq!(s.policy.as_deref(), Some("p"));
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
