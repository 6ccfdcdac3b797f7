//! Webhook request signing.
//!
//! `Enricher-Signature: v1=<hex>` where `<hex>` is HMAC-SHA256, keyed with the
//! subscription's secret, over `"{timestamp}.{body}"`; `timestamp` is the
//! `Enricher-Timestamp` header (Unix seconds) and `body` the raw request body. Receivers
//! recompute it, compare in constant time, and refuse timestamps too far from their clock
//! (replays). See docs/webhooks.md.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const SIGNATURE_HEADER: &str = "Enricher-Signature";
pub const TIMESTAMP_HEADER: &str = "Enricher-Timestamp";
/// Stable per (event, subscription): the same on every retry and replay.
pub const IDEMPOTENCY_HEADER: &str = "Enricher-Idempotency-Key";
pub const EVENT_ID_HEADER: &str = "Enricher-Event-Id";
pub const EVENT_TYPE_HEADER: &str = "Enricher-Event-Type";
pub const ATTEMPT_HEADER: &str = "Enricher-Delivery-Attempt";

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any size"));
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// The `Enricher-Signature` header value for `body` sent at `timestamp`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!(
        "v1={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// Checks a signature header (which may list several `v1=` values, comma-separated, e.g.
/// during a secret rotation) in constant time, and that `timestamp` is within `tolerance_s`
/// of `now_s`.
pub fn verify(
    secret: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
    now_s: i64,
    tolerance_s: i64,
) -> bool {
    if (now_s - timestamp).abs() > tolerance_s {
        return false;
    }
    header
        .split(',')
        .filter_map(|p| p.trim().strip_prefix("v1="))
        .filter_map(|h| hex::decode(h).ok())
        .any(|sig| mac(secret, timestamp, body).verify_slice(&sig).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_openssl() {
        // printf '%s' '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec_test
        assert_eq!(
            sign("whsec_test", 1_700_000_000, br#"{"a":1}"#),
            "v1=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
        );
    }

    #[test]
    fn verifies_its_own_signatures_and_nothing_else() {
        let body = br#"{"event_id":"x"}"#;
        let h = sign("s3cret", 1_000, body);
        assert!(h.starts_with("v1=") && h.len() == 3 + 64);
        assert!(verify("s3cret", 1_000, body, &h, 1_010, 300));
        assert!(verify(
            "s3cret",
            1_000,
            body,
            &format!("v1=00, {h}"),
            1_000,
            300
        ));
        assert!(!verify("other", 1_000, body, &h, 1_000, 300));
        assert!(!verify("s3cret", 1_001, body, &h, 1_001, 300));
        assert!(!verify("s3cret", 1_000, b"{}", &h, 1_000, 300));
        assert!(!verify("s3cret", 1_000, body, &h, 2_000, 300), "too old");
        assert!(!verify("s3cret", 1_000, body, "v1=zz", 1_000, 300));
        assert!(!verify("s3cret", 1_000, body, "", 1_000, 300));
    }
}
