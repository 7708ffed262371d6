//! Incremental UTF-8 validation for text messages that arrive in pieces (RFC 6455 §8.1).
//!
//! The validator keeps at most three bytes of an unfinished code point between calls, and fails
//! as soon as a byte makes the input impossible to complete (an invalid prefix), rather than
//! waiting for the end of the message.

/// UTF-8 state carried across fragments.
#[derive(Debug, Default, Clone, Copy)]
pub struct Utf8Validator {
    pending: [u8; 4],
    len: u8,
}

/// The bytes can never become valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

impl Utf8Validator {
    /// Check the next bytes of the text.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), InvalidUtf8> {
        // First finish the code point left open by the previous call, one byte at a time. A
        // validator that already failed (a full buffer that is not a code point) stays failed.
        while self.len > 0 {
            let Some((&b, rest)) = bytes.split_first() else { return Ok(()) };
            bytes = rest;
            if self.len as usize >= self.pending.len() {
                return Err(InvalidUtf8);
            }
            self.pending[self.len as usize] = b;
            self.len += 1;
            match std::str::from_utf8(&self.pending[..self.len as usize]) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_some() => return Err(InvalidUtf8),
                Err(_) => {}
            }
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            // `error_len() == None`: the input ends inside a code point that may still complete.
            Err(e) if e.error_len().is_none() => {
                let tail = &bytes[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// Whether the text fed so far ends on a code point boundary.
    pub fn is_complete(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_everywhere(bytes: &[u8]) -> Vec<Result<bool, InvalidUtf8>> {
        (0..=bytes.len())
            .map(|i| {
                let mut v = Utf8Validator::default();
                v.feed(&bytes[..i])?;
                v.feed(&bytes[i..])?;
                Ok(v.is_complete())
            })
            .collect()
    }

    #[test]
    fn valid_text_split_anywhere() {
        let s = "κόσμε a€𝄞\u{10ffff}\u{7f}\u{80}\u{7ff}\u{800}\u{fffd}";
        for r in split_everywhere(s.as_bytes()) {
            assert_eq!(r, Ok(true));
        }
    }

    #[test]
    fn invalid_sequences_fail() {
        let cases: &[&[u8]] = &[
            &[0xff],
            &[0xc0, 0x80],             // over-long NUL
            &[0xe0, 0x80, 0x80],       // over-long
            &[0xed, 0xa0, 0x80],       // UTF-16 surrogate U+D800
            &[0xed, 0xbf, 0xbf],       // U+DFFF
            &[0xf4, 0x90, 0x80, 0x80], // U+110000
            &[0xf5, 0x80, 0x80, 0x80],
            &[0x80], // lone continuation
            &[0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xed, 0xa0, 0x80, 0x65, 0x64],
        ];
        for c in cases {
            for r in split_everywhere(c) {
                assert_eq!(r, Err(InvalidUtf8), "{c:02x?}");
            }
        }
    }

    #[test]
    fn fails_fast_on_an_impossible_prefix() {
        let mut v = Utf8Validator::default();
        // 0xf4 0x90 can never start a valid code point: no need to wait for more bytes.
        assert_eq!(v.feed(&[b'a', 0xf4]), Ok(()));
        assert_eq!(v.feed(&[0x90]), Err(InvalidUtf8));
        let mut v = Utf8Validator::default();
        assert_eq!(v.feed(&[0xed, 0xa0]), Err(InvalidUtf8));
    }

    #[test]
    fn fed_again_after_failing_it_still_fails() {
        let mut v = Utf8Validator::default();
        v.feed(&[b'a', 0xf0, 0x90, 0x80]).unwrap();
        assert_eq!(v.feed(b"A"), Err(InvalidUtf8));
        assert_eq!(v.feed(b"B"), Err(InvalidUtf8));
    }

    #[test]
    fn incomplete_at_the_end() {
        let mut v = Utf8Validator::default();
        v.feed(&[0xe2, 0x82]).unwrap();
        assert!(!v.is_complete());
        v.feed(&[0xac]).unwrap();
        assert!(v.is_complete());
    }
}
