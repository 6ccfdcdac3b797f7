//! Webhook URLs and the SSRF guard.
//!
//! A webhook makes this service send requests to an address an API caller chose, from inside
//! the network it runs in. So a URL must be `http` or `https`, carry no credentials, and every
//! address its host resolves to must be allowed by the [`AddressPolicy`]: private,
//! shared (CGNAT), link-local (cloud metadata at 169.254.169.254), unique-local and other
//! non-public ranges are refused unless `delivery.allow_private_networks` is set; loopback is
//! allowed unless `delivery.allow_loopback` is off (local receivers and tests); unspecified,
//! multicast and broadcast addresses are never allowed.
//!
//! The check runs when a subscription is created and again before every send; the sender's
//! HTTP client also resolves names through [`GuardedResolver`], which applies the same policy
//! to the addresses it actually connects to (so a DNS answer that changes between the check
//! and the connection — DNS rebinding — is refused too). The client uses no proxy and follows
//! no redirects.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use reqwest::Url;

/// Which destination addresses webhooks may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressPolicy {
    pub allow_private: bool,
    pub allow_loopback: bool,
}

impl Default for AddressPolicy {
    fn default() -> Self {
        Self {
            allow_private: false,
            allow_loopback: true,
        }
    }
}

/// What kind of address an IP is, for the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrClass {
    Public,
    Loopback,
    /// Not publicly routable: private, shared, link-local, unique-local, reserved, ...
    Private(&'static str),
    /// Never a valid destination (unspecified, multicast, broadcast).
    Never(&'static str),
}

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    let o = ip.octets();
    match o {
        [0, ..] => AddrClass::Never("\"this network\" (0.0.0.0/8)"),
        [127, ..] => AddrClass::Loopback,
        [10, ..] => AddrClass::Private("private (10.0.0.0/8)"),
        [100, b, ..] if (64..128).contains(&b) => {
            AddrClass::Private("shared/CGNAT (100.64.0.0/10)")
        }
        [169, 254, ..] => AddrClass::Private("link-local (169.254.0.0/16)"),
        [172, b, ..] if (16..32).contains(&b) => AddrClass::Private("private (172.16.0.0/12)"),
        [192, 168, ..] => AddrClass::Private("private (192.168.0.0/16)"),
        [192, 0, 0, _] => AddrClass::Private("IETF protocol assignment (192.0.0.0/24)"),
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => {
            AddrClass::Private("documentation")
        }
        [198, b, ..] if b == 18 || b == 19 => AddrClass::Private("benchmarking (198.18.0.0/15)"),
        [255, 255, 255, 255] => AddrClass::Never("broadcast"),
        [a, ..] if (224..240).contains(&a) => AddrClass::Never("multicast"),
        [a, ..] if a >= 240 => AddrClass::Private("reserved (240.0.0.0/4)"),
        _ => AddrClass::Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    if ip.is_unspecified() {
        return AddrClass::Never("unspecified (::)");
    }
    if ip.is_loopback() {
        return AddrClass::Loopback;
    }
    let s = ip.segments();
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    match s {
        // IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d): the IPv4 address decides
        [0, 0, 0, 0, 0, 0xffff, hi, lo] | [0, 0, 0, 0, 0, 0, hi, lo] => {
            classify_v4(embedded(hi, lo))
        }
        // NAT64 well-known prefix: translated to the embedded IPv4 address
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => classify_v4(embedded(hi, lo)),
        [0x64, 0xff9b, 1, ..] => AddrClass::Private("local-use NAT64 (64:ff9b:1::/48)"),
        // 6to4: 2002:AABB:CCDD::/48 carries IPv4 AA.BB.CC.DD
        [0x2002, hi, lo, ..] => classify_v4(embedded(hi, lo)),
        [0x2001, 0, ..] => AddrClass::Private("Teredo (2001::/32)"),
        [0x2001, 0xdb8, ..] => AddrClass::Private("documentation (2001:db8::/32)"),
        [0x100, 0, 0, 0, ..] => AddrClass::Private("discard-only (100::/64)"),
        [a, ..] if a & 0xfe00 == 0xfc00 => AddrClass::Private("unique-local (fc00::/7)"),
        [a, ..] if a & 0xffc0 == 0xfe80 => AddrClass::Private("link-local (fe80::/10)"),
        [a, ..] if a & 0xffc0 == 0xfec0 => AddrClass::Private("site-local (fec0::/10)"),
        [a, ..] if a & 0xff00 == 0xff00 => AddrClass::Never("multicast (ff00::/8)"),
        _ => AddrClass::Public,
    }
}

pub fn classify(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

impl AddressPolicy {
    /// Why `ip` is refused, or `None` when it is allowed.
    pub fn refusal(&self, ip: IpAddr) -> Option<String> {
        match classify(ip) {
            AddrClass::Public => None,
            AddrClass::Loopback if self.allow_loopback => None,
            AddrClass::Loopback => {
                Some("a loopback address (set delivery.allow_loopback to allow it)".into())
            }
            AddrClass::Private(_) if self.allow_private => None,
            AddrClass::Private(what) => Some(format!(
                "a {what} address (set delivery.allow_private_networks to allow private ranges)"
            )),
            AddrClass::Never(what) => Some(format!("a {what} address")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("is not a valid URL: {0}")]
    Parse(String),
    #[error("must use http or https, not `{0}`")]
    Scheme(String),
    #[error("must not contain a user name or password")]
    Credentials,
    #[error("has no host")]
    NoHost,
    #[error("is longer than {MAX_URL_CHARS} characters")]
    TooLong,
    /// The host is, or resolves to, an address the policy refuses.
    #[error("{host} is {addr}, {why}")]
    Forbidden {
        host: String,
        addr: IpAddr,
        why: String,
    },
    /// The host name could not be resolved (may be temporary).
    #[error("{host} could not be resolved: {message}")]
    Resolve { host: String, message: String },
}

pub const MAX_URL_CHARS: usize = 2048;

/// A syntactically valid webhook URL (http/https, a host, no credentials) whose host, when it
/// is an IP address, the policy allows. Names are checked by [`WebhookUrl::check_resolved`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl(Url);

impl WebhookUrl {
    pub fn parse(s: &str, policy: AddressPolicy) -> Result<Self, UrlError> {
        let s = s.trim();
        if s.chars().count() > MAX_URL_CHARS {
            return Err(UrlError::TooLong);
        }
        let url = Url::parse(s).map_err(|e| UrlError::Parse(e.to_string()))?;
        match url.scheme() {
            "http" | "https" => {}
            other => return Err(UrlError::Scheme(other.to_string())),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(UrlError::Credentials);
        }
        let host = url.host_str().ok_or(UrlError::NoHost)?;
        if host.is_empty() {
            return Err(UrlError::NoHost);
        }
        let literal = ip_literal(host);
        if let Some(ip) = literal {
            if let Some(why) = policy.refusal(ip) {
                return Err(UrlError::Forbidden {
                    host: ip.to_string(),
                    addr: ip,
                    why,
                });
            }
        }
        Ok(Self(url))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn url(&self) -> &Url {
        &self.0
    }

    /// The host, for log lines (never the whole URL: its query may hold a receiver's token).
    pub fn host(&self) -> String {
        self.0.host_str().unwrap_or("").to_string()
    }

    /// Resolves the host and checks every address it resolves to.
    pub async fn check_resolved(&self, policy: AddressPolicy) -> Result<(), UrlError> {
        let host = match self.0.host_str() {
            // literals were checked by parse
            Some(h) if ip_literal(h).is_none() => h.to_string(),
            _ => return Ok(()),
        };
        let port = self.0.port_or_known_default().unwrap_or(80);
        check_host(&host, port, policy).await.map(|_| ())
    }
}

/// The address of a URL host that is an IP literal (the URL parser has already normalised
/// numeric forms such as `0x7f000001` to dotted quads, and brackets IPv6).
fn ip_literal(host: &str) -> Option<IpAddr> {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
        None => host.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    }
}

/// Resolves `host` and returns its addresses when the policy allows every one of them.
async fn check_host(
    host: &str,
    port: u16,
    policy: AddressPolicy,
) -> Result<Vec<SocketAddr>, UrlError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| UrlError::Resolve {
            host: host.to_string(),
            message: e.to_string(),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(UrlError::Resolve {
            host: host.to_string(),
            message: "no address".into(),
        });
    }
    for a in &addrs {
        if let Some(why) = policy.refusal(a.ip()) {
            return Err(UrlError::Forbidden {
                host: host.to_string(),
                addr: a.ip(),
                why,
            });
        }
    }
    Ok(addrs)
}

/// The HTTP client's name resolver: system resolution, then the policy on every address.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    pub policy: AddressPolicy,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = check_host(&host, 0, policy).await?;
            let it: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(it)
        })
    }
}

impl GuardedResolver {
    pub fn shared(policy: AddressPolicy) -> Arc<Self> {
        Arc::new(Self { policy })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: AddressPolicy = AddressPolicy {
        allow_private: false,
        allow_loopback: true,
    };

    fn refused(ip: &str, p: AddressPolicy) -> bool {
        p.refusal(ip.parse().unwrap()).is_some()
    }

    #[test]
    fn private_link_local_and_unique_local_ranges_are_refused_by_default() {
        for ip in [
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "169.254.169.254", // cloud metadata
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.8",
            "198.18.0.1",
            "240.0.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "fc00::1",
            "fd12:3456:789a::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "::",
            "::ffff:10.0.0.1", // IPv4-mapped private
            "::ffff:169.254.169.254",
            "::10.0.0.1",     // IPv4-compatible
            "64:ff9b::a00:1", // NAT64 of 10.0.0.1
            "2002:a00:1::1",  // 6to4 of 10.0.0.1
            "2001:db8::1",
        ] {
            assert!(refused(ip, DEFAULT), "{ip} should be refused");
        }
    }

    #[test]
    fn public_addresses_and_loopback_are_allowed_by_default() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "192.169.0.1",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!refused(ip, DEFAULT), "{ip} should be allowed");
        }
    }

    #[test]
    fn settings_open_private_ranges_or_close_loopback_but_never_unspecified_or_multicast() {
        let open = AddressPolicy {
            allow_private: true,
            allow_loopback: true,
        };
        assert!(!refused("10.0.0.1", open));
        assert!(!refused("fd00::1", open));
        assert!(!refused("169.254.169.254", open));
        assert!(refused("0.0.0.0", open));
        assert!(refused("224.0.0.1", open));
        assert!(refused("ff02::1", open));
        let closed = AddressPolicy {
            allow_private: false,
            allow_loopback: false,
        };
        assert!(refused("127.0.0.1", closed));
        assert!(refused("::1", closed));
        assert!(refused("::ffff:127.0.0.1", closed));
        assert!(!refused("8.8.8.8", closed));
    }

    #[test]
    fn urls_must_be_http_with_a_host_and_no_credentials() {
        let ok = |s: &str| WebhookUrl::parse(s, DEFAULT);
        assert!(ok("https://pim.example.com/hooks/enricher?x=1").is_ok());
        assert!(ok("http://127.0.0.1:9000/hook").is_ok());
        assert!(ok("http://[::1]:9000/hook").is_ok());
        assert_eq!(
            ok("ftp://example.com/x"),
            Err(UrlError::Scheme("ftp".into()))
        );
        assert_eq!(
            ok("file:///etc/passwd"),
            Err(UrlError::Scheme("file".into()))
        );
        assert!(matches!(ok("gopher://x"), Err(UrlError::Scheme(_))));
        assert_eq!(
            ok("https://user:pw@example.com/"),
            Err(UrlError::Credentials)
        );
        assert!(matches!(ok("not a url"), Err(UrlError::Parse(_))));
        assert!(matches!(
            ok("http://10.1.2.3/"),
            Err(UrlError::Forbidden { .. })
        ));
        assert!(matches!(
            ok("http://169.254.169.254/latest/meta-data/"),
            Err(UrlError::Forbidden { .. })
        ));
        assert!(matches!(
            ok("http://[fd00::1]/"),
            Err(UrlError::Forbidden { .. })
        ));
        // numeric forms the URL parser normalises are checked as addresses too
        assert!(ok("http://0x7f000001/").is_ok());
        assert!(matches!(
            ok("http://167772161/"),
            Err(UrlError::Forbidden { .. })
        )); // 10.0.0.1
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_CHARS));
        assert_eq!(ok(&long), Err(UrlError::TooLong));
    }

    #[tokio::test]
    async fn names_are_resolved_and_every_address_checked() {
        let url = WebhookUrl::parse("http://localhost:9/x", DEFAULT).unwrap();
        url.check_resolved(DEFAULT).await.unwrap();
        let closed = AddressPolicy {
            allow_private: false,
            allow_loopback: false,
        };
        let err = url.check_resolved(closed).await.unwrap_err();
        assert!(matches!(err, UrlError::Forbidden { .. }), "{err}");
        assert!(err.to_string().contains("loopback"), "{err}");
        let err = WebhookUrl::parse("http://no-such-host.invalid/", DEFAULT)
            .unwrap()
            .check_resolved(DEFAULT)
            .await
            .unwrap_err();
        assert!(matches!(err, UrlError::Resolve { .. }), "{err}");
    }

    #[tokio::test]
    async fn the_http_clients_resolver_applies_the_policy_to_what_it_connects_to() {
        use reqwest::dns::Resolve;
        let name = |h: &str| h.parse::<reqwest::dns::Name>().unwrap();
        let open = GuardedResolver { policy: DEFAULT };
        let addrs: Vec<SocketAddr> = open.resolve(name("localhost")).await.unwrap().collect();
        assert!(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()));
        let closed = GuardedResolver {
            policy: AddressPolicy {
                allow_private: false,
                allow_loopback: false,
            },
        };
        let err = match closed.resolve(name("localhost")).await {
            Ok(_) => panic!("loopback resolved with loopback closed"),
            Err(e) => e,
        };
        assert!(err.downcast_ref::<UrlError>().is_some(), "{err}");
        // and through a real client: the request never leaves
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(GuardedResolver::shared(closed.policy))
            .build()
            .unwrap();
        let e = client.get("http://localhost:9/").send().await.unwrap_err();
        let mut found = false;
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = src {
            found |= s.downcast_ref::<UrlError>().is_some();
            src = s.source();
        }
        assert!(found, "the policy error is in the chain: {e:?}");
    }
}
