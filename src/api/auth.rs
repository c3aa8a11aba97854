//! Caller authentication: `Authorization: Bearer <token>` → customer id.
//!
//! Identity comes only from the credential. Tokens are read from
//! `UNKEY_METALD_AUTH_TOKENS_FILE` (`<token> <customer_id>` per line, `#`
//! comments); with `UNKEY_METALD_AUTH_DEV_TOKENS=true`, `dev_customer_<id>`
//! is also accepted as customer `<id>` for compatibility with existing
//! development clients.

use std::collections::HashMap;
use std::path::Path;

use http::HeaderMap;

use crate::error::Error;
use crate::model::CustomerId;

pub const DEV_TOKEN_PREFIX: &str = "dev_customer_";
const MAX_CUSTOMER_ID_LEN: usize = 128;

#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    tokens: HashMap<String, CustomerId>,
    dev_tokens: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TokensFileError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}:{line}: {why}")]
    Line { path: String, line: usize, why: String },
}

fn valid_customer_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_CUSTOMER_ID_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Authenticator {
    pub fn new(tokens: HashMap<String, CustomerId>, dev_tokens: bool) -> Self {
        Authenticator { tokens, dev_tokens }
    }

    pub fn from_file(path: Option<&Path>, dev_tokens: bool) -> Result<Self, TokensFileError> {
        let mut tokens = HashMap::new();
        if let Some(path) = path {
            let p = path.display().to_string();
            let text =
                std::fs::read_to_string(path).map_err(|source| TokensFileError::Read { path: p.clone(), source })?;
            tokens = parse_tokens(&text).map_err(|(line, why)| TokensFileError::Line { path: p, line, why })?;
        }
        Ok(Authenticator { tokens, dev_tokens })
    }

    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// The customer the request's credential belongs to.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<CustomerId, Error> {
        let value = headers.get(http::header::AUTHORIZATION).ok_or_else(|| {
            Error::Unauthenticated("missing Authorization header; send 'Authorization: Bearer <token>'".into())
        })?;
        let value =
            value.to_str().map_err(|_| Error::Unauthenticated("Authorization header is not valid text".into()))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::Unauthenticated("Authorization header must be 'Bearer <token>'".into()))?;
        if let Some(c) = self.tokens.get(token) {
            return Ok(c.clone());
        }
        if self.dev_tokens
            && let Some(id) = token.strip_prefix(DEV_TOKEN_PREFIX)
            && valid_customer_id(id)
        {
            return Ok(CustomerId(id.to_owned()));
        }
        Err(Error::Unauthenticated("invalid token".into()))
    }
}

/// Parses the tokens file; errors carry the 1-based line number.
pub fn parse_tokens(text: &str) -> Result<HashMap<String, CustomerId>, (usize, String)> {
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(token), Some(customer), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err((n, "expected '<token> <customer_id>'".into()));
        };
        if token.len() < 16 {
            return Err((n, "token is shorter than 16 characters".into()));
        }
        if !valid_customer_id(customer) {
            return Err((
                n,
                format!("customer id {customer:?} must be 1-{MAX_CUSTOMER_ID_LEN} of letters, digits, '-', '_', '.'"),
            ));
        }
        if out.insert(token.to_owned(), CustomerId(customer.to_owned())).is_some() {
            return Err((n, "token appears twice".into()));
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::Code;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(http::header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn tokens_file_parses_and_reports_lines() {
        let t = parse_tokens("# comment\n\nsecret-token-aaaaaa acme\nsecret-token-bbbbbb beta\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(parse_tokens("x y z").unwrap_err().0, 1);
        assert_eq!(parse_tokens("\nshort acme").unwrap_err().0, 2);
        assert!(parse_tokens("aaaaaaaaaaaaaaaa a\naaaaaaaaaaaaaaaa b").is_err());
    }

    #[test]
    fn bearer_tokens_map_to_customers() {
        let a = Authenticator::new(parse_tokens("secret-token-aaaaaa acme").unwrap(), false);
        assert_eq!(a.authenticate(&headers(Some("Bearer secret-token-aaaaaa"))).unwrap().0, "acme");
        for bad in
            [None, Some("secret-token-aaaaaa"), Some("Bearer "), Some("Bearer nope"), Some("Bearer dev_customer_x")]
        {
            let e = a.authenticate(&headers(bad)).unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn dev_tokens_only_when_enabled() {
        let a = Authenticator::new(HashMap::new(), true);
        assert_eq!(a.authenticate(&headers(Some("Bearer dev_customer_acme"))).unwrap().0, "acme");
        assert!(a.authenticate(&headers(Some("Bearer dev_customer_"))).is_err());
        assert!(a.authenticate(&headers(Some("Bearer dev_customer_a/b"))).is_err());
    }

    #[test]
    fn other_headers_never_identify() {
        let a = Authenticator::new(HashMap::new(), true);
        let mut h = headers(None);
        h.insert("baggage", "customer_id=acme".parse().unwrap());
        h.insert("x-customer-id", "acme".parse().unwrap());
        assert_eq!(a.authenticate(&h).unwrap_err().code(), Code::Unauthenticated);
    }
}
