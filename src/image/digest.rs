//! sha256 digests: parsing `sha256:<64 hex>`, hashing bytes and files, and
//! checking content against its descriptor ([`verify`]). Only sha256 is
//! accepted (the only algorithm registries use in practice); anything else
//! is refused rather than trusted unchecked.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::error::ImageError;

/// The 64 lower-case hex characters of a `sha256:` digest, or an error.
pub fn hex_of(digest: &str) -> Result<&str, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| ImageError::Unsupported(format!("digest {digest:?}: only sha256 digests are supported")))?;
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(hex)
    } else {
        Err(ImageError::Unsupported(format!("digest {digest:?} is not sha256 followed by 64 hex digits")))
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn of_bytes(bytes: &[u8]) -> String {
    format_hash(Sha256::digest(bytes).as_slice())
}

/// `sha256:<hex>` of a finished hasher.
pub fn finish(h: Sha256) -> String {
    format_hash(h.finalize().as_slice())
}

fn format_hash(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// `sha256:<hex>` of everything `r` yields, and its length.
pub fn of_reader(mut r: impl Read) -> io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            return Ok((finish(h), n));
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

/// `sha256:<hex>` of a file and its length.
pub fn of_file(path: &Path) -> Result<(String, u64), ImageError> {
    let f = File::open(path).map_err(ImageError::io("open", path))?;
    of_reader(f).map_err(ImageError::io("read", path))
}

/// Checks that content of `size` bytes hashing to `actual` is what the
/// descriptor (`expected`, `expected_size` when known) names.
pub fn verify(expected: &str, expected_size: Option<u64>, actual: &str, size: u64) -> Result<(), ImageError> {
    hex_of(expected)?;
    if let Some(want) = expected_size.filter(|w| *w != size) {
        return Err(ImageError::DigestMismatch {
            digest: expected.to_owned(),
            reason: format!("{size} bytes instead of the {want} its descriptor says"),
        });
    }
    if actual != expected {
        return Err(ImageError::DigestMismatch {
            digest: expected.to_owned(),
            reason: format!("content hashes to {actual}"),
        });
    }
    Ok(())
}

/// A file name for a string that may be anything (a customer id, a
/// reference): the hex of its sha256, so no raw id ever names a file.
pub fn name_for(s: &str) -> String {
    of_bytes(s.as_bytes()).split_off(7)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn hashes_and_verifies() {
        assert_eq!(of_bytes(b""), EMPTY);
        assert_eq!(of_reader(&b"abc"[..]).unwrap().1, 3);
        verify(EMPTY, Some(0), &of_bytes(b""), 0).unwrap();
        verify(EMPTY, None, &of_bytes(b""), 0).unwrap();
        let e = verify(EMPTY, None, &of_bytes(b"x"), 1).unwrap_err();
        assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
        let e = verify(EMPTY, Some(5), EMPTY, 0).unwrap_err();
        assert!(e.to_string().contains("0 bytes instead of the 5"), "{e}");
    }

    #[test]
    fn only_well_formed_sha256_digests_are_accepted() {
        assert_eq!(hex_of(EMPTY).unwrap().len(), 64);
        for bad in [
            "sha512:abcd",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:../../x",
            "e3b0",
        ] {
            assert!(hex_of(bad).is_err(), "{bad}");
        }
        assert!(verify("md5:x", None, EMPTY, 0).is_err());
        assert_eq!(name_for("customer-1").len(), 64);
        assert_ne!(name_for("a"), name_for("b"));
    }
}
