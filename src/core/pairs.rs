//! proxy-wasm's map encoding, used by Envoy for header maps and for a metadata map
//! read as one property: `u32` count, then each key's and value's `u32` length, then
//! each key and value followed by a NUL. Checked end to end: no slice past the input.

fn u32_at(bytes: &[u8], at: usize) -> Result<usize, String> {
    let end = at.checked_add(4).ok_or("truncated pairs")?;
    let word: [u8; 4] = bytes
        .get(at..end)
        .and_then(|b| b.try_into().ok())
        .ok_or("truncated pairs")?;
    usize::try_from(u32::from_le_bytes(word)).map_err(|_| "length too large".to_string())
}

/// One key and its value, as bytes.
pub type Pair<'a> = (&'a [u8], &'a [u8]);

/// proxy-wasm's map encoding, checked end to end (no slice past the input).
pub fn pairs(bytes: &[u8]) -> Result<Vec<Pair<'_>>, String> {
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

/// Where each key and value of [`pairs`] lie in `bytes`: (key start, key end, value
/// start, value end), for a caller that keeps the bytes and looks keys up in place.
pub fn spans(bytes: &[u8]) -> Result<Vec<[u32; 4]>, String> {
    let base = bytes.as_ptr() as usize;
    let at = |s: &[u8]| -> Result<(u32, u32), String> {
        let start = (s.as_ptr() as usize).wrapping_sub(base);
        let end = start + s.len();
        Ok((
            u32::try_from(start).map_err(|_| "map too large")?,
            u32::try_from(end).map_err(|_| "map too large")?,
        ))
    };
    pairs(bytes)?
        .into_iter()
        .map(|(k, v)| {
            let (a, b) = at(k)?;
            let (c, d) = at(v)?;
            Ok([a, b, c, d])
        })
        .collect()
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

/// Encodes pairs (the inverse of [`pairs`]).
pub fn encode(pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        4 + pairs
            .iter()
            .map(|(k, v)| 10 + k.len() + v.len())
            .sum::<usize>(),
    );
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_truncation_is_an_error() {
        let encoded = encode(&[(":status", b"200"), ("x-bin", &[0xff, 0xfe])]);
        let decoded = pairs(&encoded).unwrap();
        assert_eq!(
            decoded,
            vec![
                (&b":status"[..], &b"200"[..]),
                (&b"x-bin"[..], &[0xff, 0xfe][..])
            ]
        );
        for cut in 1..encoded.len() {
            assert!(pairs(&encoded[..cut]).is_err());
        }
        assert!(pairs(&[0xff, 0xff, 0xff, 0x7f]).is_err());
        let spans = spans(&encoded).unwrap();
        let back: Vec<_> = spans
            .iter()
            .map(|[a, b, c, d]| {
                (
                    &encoded[*a as usize..*b as usize],
                    &encoded[*c as usize..*d as usize],
                )
            })
            .collect();
        assert_eq!(back, decoded);
    }
}
