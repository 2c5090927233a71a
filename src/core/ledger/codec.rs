//! Byte encoding shared by the ledger's records: little-endian integers and short
//! strings (a `u8` length, so at most [`MAX_STORED_STR`] bytes). Decoding checks every
//! length against the input: malformed bytes are an error, never a guess or a panic.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError;

/// The longest string a record stores; longer labels are cut (on a character boundary).
pub const MAX_STORED_STR: usize = 255;

/// `s` cut to at most `max` bytes without splitting a character.
pub fn clamp_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub fn put_str(w: &mut Vec<u8>, s: &str) {
    let bytes = clamp_str(s, MAX_STORED_STR).as_bytes();
    w.push(bytes.len() as u8);
    w.extend_from_slice(bytes);
}

pub fn put_u16(w: &mut Vec<u8>, v: u16) {
    w.extend_from_slice(&v.to_le_bytes());
}

pub fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}

pub fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}

/// A list length as one byte; callers keep their lists at most 255 long.
pub fn put_len(w: &mut Vec<u8>, len: usize) {
    w.push(len.min(255) as u8);
}

pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError)?;
        let slice = self.bytes.get(self.at..end).ok_or(DecodeError)?;
        self.at = end;
        Ok(slice)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    pub fn string(&mut self) -> Result<String, DecodeError> {
        let len = usize::from(self.u8()?);
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError)
    }

    pub fn end(&self) -> Result<(), DecodeError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(DecodeError)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_cut_on_a_character_boundary() {
        let s = format!("{}é", "a".repeat(254));
        assert_eq!(clamp_str(&s, 255).len(), 254);
        let mut w = Vec::new();
        put_str(&mut w, &s);
        assert_eq!(Reader::new(&w).string().unwrap(), "a".repeat(254));
    }

    #[test]
    fn reading_past_the_end_is_an_error() {
        let mut r = Reader::new(&[1, 2]);
        assert!(r.u32().is_err());
        assert_eq!(Reader::new(&[5, b'a']).string(), Err(DecodeError));
    }
}
