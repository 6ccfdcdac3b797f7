//! The per-field rules of a rule pack, run over one text (a text field or one list item), and
//! the list-level rules (duplicates, hashtag count).
//!
//! Each rule produces a [`Hit`]: the rule id, the char span, a message, and the deterministic
//! fix the repair step may apply. `check` turns hits into findings; `repair` applies fixes.

use std::{collections::BTreeMap, sync::LazyLock};

use regex::Regex;

use super::{
    claims::{self, ClaimKind},
    grounding::{Brands, SpecFacts},
    injection::Injection,
    text::{self, count, dup_key, find_phrase, is_emoji, overflow_at, regex_spans, slice},
    Counting, FieldRules, RulePack, Severity,
};
use crate::spec::ProductSpec;

/// The fix a rule's hit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fix {
    /// Remove the span (a forbidden character or phrase, a tag, a URL, a placeholder).
    Remove,
    /// Drop the sentence (or the item) holding the span: commerce claims, injection echoes.
    DropSentence,
    /// Drop an unsupported claim: its list segment, its sentence, or the token itself.
    DropClaim,
    /// Trim to this many (counted) characters on a word boundary.
    Trim(usize),
    /// Upper-case the first letter.
    Capitalize,
    /// Drop the whole item (a malformed hashtag).
    DropItem,
    /// Nothing deterministic: a reviewer or the fallback must handle it.
    None,
}

/// One rule violation in one text.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub rule: &'static str,
    pub span: Option<(usize, usize)>,
    pub message: String,
    pub fix: Fix,
}

/// Severity of a rule unless the pack overrides it.
pub fn default_severity(rule: &str) -> Severity {
    match rule {
        "length.recommended" | "caps.word" => Severity::Warning,
        _ => Severity::Error,
    }
}

/// Length limits of one text (a field, or one item of a list field).
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub min: Option<usize>,
    pub max: Option<usize>,
    pub warn: Option<usize>,
    pub counting: Counting,
}

impl Limits {
    pub fn text(r: &FieldRules) -> Self {
        Limits {
            min: r.min_chars,
            max: r.max_chars,
            warn: r.warn_max_chars,
            counting: r.counting.unwrap_or_default(),
        }
    }

    pub fn item(r: &FieldRules) -> Self {
        Limits {
            min: r.item_min_chars,
            max: r.item_max_chars,
            warn: r.item_warn_max_chars,
            counting: r.counting.unwrap_or_default(),
        }
    }
}

/// Everything the rules need besides the text, built once per check or repair.
#[derive(Debug, Clone)]
pub struct Ctx<'a> {
    pub pack: &'a RulePack,
    pub spec: &'a ProductSpec,
    pub facts: SpecFacts,
    pub brands: Brands,
    pub certs: Vec<String>,
    pub injection: Injection,
}

impl<'a> Ctx<'a> {
    pub fn new(pack: &'a RulePack, spec: &'a ProductSpec) -> Self {
        let g = &pack.grounding;
        let mut certs: Vec<String> = match &g.certifications {
            Some(c) => c.clone(),
            None => claims::DEFAULT_CERTIFICATIONS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        certs.extend(g.extra_certifications.iter().cloned());
        certs.retain(|c| !c.trim().is_empty());
        Ctx {
            pack,
            spec,
            facts: SpecFacts::new(spec, &certs, g),
            brands: Brands::new(g),
            certs,
            injection: Injection::new(spec, &pack.injection.extra_phrases),
        }
    }
}

static HTML: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>|&(?:[A-Za-z]{2,10}|#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6});")
        .expect("html regex")
});

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
        .expect("email regex")
});

static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?x)
        \+\d{1,3}[\s.-]?\(?\d{1,4}\)?(?:[\s.-]?\d{2,4}){2,4}\b
        | \(\d{3}\)\s?\d{3}[\s.-]\d{4}\b
        | \b1[\s.-]8\d\d[\s.-]\d{3}[\s.-]\d{4}\b
        | \b\d{3}[.-]\d{3}[.-]\d{4}\b
        | \b0\d{2,4}[\s-]\d{6,8}\b
        ",
    )
    .expect("phone regex")
});

static PLACEHOLDER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?x)
        (?i:\b(?:n/a|tbd|tba|tbc|todo|fixme|lorem\s+ipsum(?:\s+dolor(?:\s+sit\s+amet)?)?|placeholder|sample\s+text|your\s+text\s+here|insert\s+[\w\ ]{1,30}?\s+here|null|undefined)\b)
        | \bNaN\b
        | \[[A-Za-z][A-Za-z\ _-]{1,39}\]
        | \{\{[^{}\n]{0,40}\}\}
        | \{[A-Za-z_]{1,30}\}
        | \b[Xx]{3,}\b
        | \?{3,}
        | _{3,}
        ",
    )
    .expect("placeholder regex")
});

static PRICE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?xi)
        [$€£¥₹]\s?\d[\d,]*(?:\.\d+)?
        | \b(?:rs\.?|inr|usd|eur|gbp)\s?\d[\d,]*(?:\.\d+)?
        | \b\d[\d,]*(?:\.\d+)?\s?(?:usd|eur|gbp|inr|dollars?|euros?|rupees?|bucks)\b
        | \b\d{1,3}\s?%\s?off\b
        | \bprice[ds]?\b | \bpricing\b
        | \bdiscount(?:s|ed)?\b
        | \bcheap(?:er|est)?\b
        | \bbargains?\b
        | \bcoupons?\b
        | \bclearance\b
        ",
    )
    .expect("price regex")
});

static SHIPPING: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?xi)
        \b(?:free|fast|quick|express|same[\s-]day|next[\s-]day|overnight|expedited|prime|worldwide|speedy)\s+(?:shipping|delivery)\b
        | \bships?\s+(?:free|fast|today|tomorrow|within|in\s+\d|worldwide|same[\s-]day|next[\s-]day|from)\b
        | \bshipping\b
        | \bdispatch(?:ed|es)?\s+(?:within|in|today|same)\b
        ",
    )
    .expect("shipping regex")
});

static AVAILABILITY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?xi)
        \b(?:in\s+stock|out\s+of\s+stock|limited\s+stock|low\s+stock|back\s+in\s+stock|sold\s+out|selling\s+fast)\b
        | \bwhile\s+(?:supplies|stocks?)\s+lasts?\b
        | \b(?:available\s+now|now\s+available|available\s+today)\b
        | \bonly\s+\d+\s+left\b
        | \blimited\s+quantit(?:y|ies)\b
        | \bpre-?orders?\b
        | \b(?:order|buy)\s+(?:now|today)\b
        | \bhurry\b
        ",
    )
    .expect("availability regex")
});

static HASHTAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:^|[^\p{L}\p{N}_&])(#[\p{L}\p{N}_]+)").expect("hashtag regex"));

static HASHTAG_ITEM: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^#[\p{L}\p{N}]+$").expect("hashtag item regex"));

/// Words in capitals that are fine anywhere: units, standards, common acronyms, sizes.
const COMMON_CAPS: &[&str] = &[
    "GB", "TB", "MB", "KB", "PB", "GHZ", "MHZ", "KHZ", "HZ", "RPM", "MAH", "WH", "KWH", "KW", "DB",
    "DPI", "PPI", "FPS", "MP", "LM", "ML", "KG", "MM", "CM", "OZ", "LB", "LBS", "FT", "USB",
    "HDMI", "LED", "LCD", "OLED", "QLED", "HD", "UHD", "FHD", "QHD", "HDR", "SSD", "HDD", "RAM",
    "ROM", "CPU", "GPU", "PC", "TV", "AC", "DC", "UK", "US", "USA", "EU", "UV", "LTE", "GPS",
    "NFC", "SD", "SDHC", "SDXC", "DVD", "CD", "VGA", "DVI", "IR", "RGB", "IPS", "DDR", "SATA",
    "SAS", "SCSI", "RAID", "NAS", "PCI", "PCIE", "LAN", "WAN", "WLAN", "AI", "BPA", "PVC", "ABS",
    "PU", "TPU", "XS", "XL", "XXL", "XXXL", "AAA", "AA", "ID", "OS", "DIY", "UPS", "ANC", "TWS",
    "IPX", "IP", "SIM", "HEPA", "LPG", "MDF", "SPF", "ISO", "CE", "UL", "FDA", "FCC", "ETL",
    "ROHS", "II", "III", "IV", "VI", "VII", "VIII", "IX", "XI", "XII", "OEM", "SKU", "NVME", "SFP",
    "POE", "VR", "AR", "API", "DSLR", "CCTV", "NHP", "HP", "AMD", "IBM", "LG", "WD", "JBL", "TCL",
    "MSI", "AOC", "ZTE", "APC", "OXO", "DJI", "HPE", "HGST", "IFB", "LSI",
];

/// Runs the rules of one text. `item` says whether the text is a list item.
pub fn scan(ctx: &Ctx<'_>, r: &FieldRules, lim: Limits, t: &str, item: bool) -> Vec<Hit> {
    let chars: Vec<char> = t.chars().collect();
    let mut out = Vec::new();
    let hit = |rule, span, message: String, fix| Hit {
        rule,
        span,
        message,
        fix,
    };

    // length
    let n = count(t, lim.counting);
    let len = chars.len();
    let unit = match lim.counting {
        Counting::Chars => "characters",
        Counting::X => "characters (X counting)",
    };
    if let Some(min) = lim.min {
        if n < min {
            out.push(hit(
                "length.min",
                None,
                format!("is {n} {unit}, at least {min} needed"),
                Fix::None,
            ));
        }
    }
    let mut too_long = false;
    if let Some(max) = lim.max {
        if n > max {
            too_long = true;
            let at = overflow_at(t, lim.counting, max).unwrap_or(len);
            out.push(hit(
                "length.max",
                Some((at, len)),
                format!("is {n} {unit}, at most {max} allowed"),
                Fix::Trim(max),
            ));
        }
    }
    if let (Some(w), false) = (lim.warn, too_long) {
        if n > w {
            let at = overflow_at(t, lim.counting, w).unwrap_or(len);
            out.push(hit(
                "length.recommended",
                Some((at, len)),
                format!("is {n} {unit}; {w} or fewer recommended"),
                Fix::None,
            ));
        }
    }

    // forbidden characters and emoji
    if let Some(fc) = &r.forbidden_chars {
        let mut seen: Vec<char> = Vec::new();
        for (i, &c) in chars.iter().enumerate() {
            if fc.contains(c) && !seen.contains(&c) {
                seen.push(c);
                out.push(hit(
                    "chars.forbidden",
                    Some((i, i + 1)),
                    format!("contains forbidden character \"{c}\""),
                    Fix::Remove,
                ));
            }
        }
    }
    if r.no_emoji == Some(true) {
        let mut i = 0;
        while i < len {
            if is_emoji(chars[i])
                && !r
                    .forbidden_chars
                    .as_deref()
                    .is_some_and(|f| f.contains(chars[i]))
            {
                let s = i;
                i += 1;
                while i < len
                    && (is_emoji(chars[i])
                        || matches!(chars[i] as u32, 0x200D | 0xFE0F | 0x1F3FB..=0x1F3FF))
                {
                    i += 1;
                }
                out.push(hit(
                    "chars.forbidden",
                    Some((s, i)),
                    format!("contains emoji \"{}\"", slice(&chars, s, i)),
                    Fix::Remove,
                ));
                continue;
            }
            i += 1;
        }
    }

    // forbidden phrases
    for p in &r.forbidden_phrases {
        for (s, e) in find_phrase(&chars, p) {
            out.push(hit(
                "phrase.forbidden",
                Some((s, e)),
                format!("contains \"{}\"", slice(&chars, s, e)),
                Fix::Remove,
            ));
        }
    }

    // markup, contacts, placeholders
    if r.no_html == Some(true) {
        for (s, e) in regex_spans(&HTML, t) {
            out.push(hit(
                "html.tag",
                Some((s, e)),
                format!("contains HTML \"{}\"", slice(&chars, s, e)),
                Fix::Remove,
            ));
        }
    }
    let emails = regex_spans(&EMAIL, t);
    if r.no_emails == Some(true) {
        for &(s, e) in &emails {
            out.push(hit(
                "contact.email",
                Some((s, e)),
                format!("contains an e-mail address \"{}\"", slice(&chars, s, e)),
                Fix::Remove,
            ));
        }
    }
    if r.no_urls == Some(true) {
        for (s, e) in text::url_spans(t) {
            if emails.iter().any(|&(a, b)| s < b && a < e) {
                continue;
            }
            out.push(hit(
                "contact.url",
                Some((s, e)),
                format!("contains a URL \"{}\"", slice(&chars, s, e)),
                Fix::Remove,
            ));
        }
    }
    if r.no_phones == Some(true) {
        for (s, e) in regex_spans(&PHONE, t) {
            out.push(hit(
                "contact.phone",
                Some((s, e)),
                format!("contains a phone number \"{}\"", slice(&chars, s, e)),
                Fix::Remove,
            ));
        }
    }
    if r.no_placeholders == Some(true) {
        let mut spans = regex_spans(&PLACEHOLDER, t);
        for p in &r.placeholders {
            spans.extend(find_phrase(&chars, p));
        }
        spans.sort_unstable();
        for (s, e) in spans {
            out.push(hit(
                "placeholder.text",
                Some((s, e)),
                format!("contains placeholder text \"{}\"", slice(&chars, s, e)),
                Fix::Remove,
            ));
        }
    }

    // price, shipping, availability
    if r.no_commerce_claims == Some(true) {
        for (re, rule, what) in [
            (&*PRICE, "claim.price", "a price claim"),
            (&*SHIPPING, "claim.shipping", "a shipping claim"),
            (
                &*AVAILABILITY,
                "claim.availability",
                "an availability claim",
            ),
        ] {
            for (s, e) in regex_spans(re, t) {
                // a word the product itself is named with ("Shipping Tags") is no claim
                let found = slice(&chars, s, e);
                if !found.chars().any(|c| c.is_ascii_digit()) && ctx.facts.mentions(&found) {
                    continue;
                }
                out.push(hit(
                    rule,
                    Some((s, e)),
                    format!("makes {what} (\"{found}\")"),
                    Fix::DropSentence,
                ));
            }
        }
    }

    // hashtags
    if item && r.hashtag_format == Some(true) && !HASHTAG_ITEM.is_match(t.trim()) {
        out.push(hit(
            "hashtag.format",
            Some((0, len)),
            format!("\"{t}\" is not # followed by letters or digits"),
            Fix::DropItem,
        ));
    }
    if !item && (r.min_hashtags.is_some() || r.max_hashtags.is_some()) {
        let tags = hashtag_spans(t);
        if let Some(max) = r.max_hashtags {
            if tags.len() > max {
                out.push(hit(
                    "hashtag.count",
                    tags.get(max).copied(),
                    format!("has {} hashtags, at most {max} allowed", tags.len()),
                    Fix::Remove,
                ));
            }
        }
        if let Some(min) = r.min_hashtags {
            if tags.len() < min {
                out.push(hit(
                    "hashtag.count",
                    None,
                    format!("has {} hashtags, at least {min} needed", tags.len()),
                    Fix::None,
                ));
            }
        }
    }

    // capital first letter
    if r.capital_start == Some(true) {
        if let Some((i, c)) = chars.iter().enumerate().find(|(_, c)| !c.is_whitespace()) {
            if c.is_lowercase() {
                out.push(hit(
                    "case.start",
                    Some((i, i + 1)),
                    "does not start with a capital letter".into(),
                    Fix::Capitalize,
                ));
            }
        }
    }

    // claims
    let claims = claims::extract(t, &ctx.certs);
    let grounding = ctx.pack.grounding.enabled && r.grounding != Some(false);
    if grounding {
        for c in &claims {
            if !ctx.facts.grounded(c) {
                let what = match c.kind {
                    ClaimKind::Number => "number",
                    ClaimKind::Year => "year",
                    ClaimKind::Percent => "percentage",
                    ClaimKind::PartNumber => "model or part number",
                    ClaimKind::Certification => "certification",
                };
                out.push(hit(
                    c.kind.rule(),
                    Some(c.span),
                    format!(
                        "states {what} \"{}\", which is not in the product data",
                        c.text
                    ),
                    Fix::DropClaim,
                ));
            }
        }
        let skip: Vec<(usize, usize)> = claims.iter().map(|c| c.span).collect();
        for (s, e, name) in ctx.brands.find(&chars, &skip) {
            if !ctx.facts.names_any(&ctx.brands.names_of(&name)) {
                out.push(hit(
                    "grounding.brand",
                    Some((s, e)),
                    format!(
                        "names brand \"{}\", which is not in the product data",
                        slice(&chars, s, e)
                    ),
                    Fix::DropClaim,
                ));
            }
        }
    }

    // capitals
    if r.all_caps == Some(true) {
        let claim_spans: Vec<(usize, usize)> = claims.iter().map(|c| c.span).collect();
        for (s, e) in caps_words(&chars) {
            let w = slice(&chars, s, e);
            let allowed = COMMON_CAPS.contains(&w.as_str())
                || r.allowed_caps.iter().any(|a| a == &w)
                || ctx.facts.has_caps_word(&w)
                || claim_spans.iter().any(|&(a, b)| s < b && a < e);
            if !allowed {
                out.push(hit(
                    "caps.word",
                    Some((s, e)),
                    format!("\"{w}\" is in capitals"),
                    Fix::None,
                ));
            }
        }
    }

    // injection echoes
    if ctx.pack.injection.enabled && r.injection != Some(false) {
        for (span, what) in ctx.injection.scan(t) {
            out.push(hit(
                "injection.echo",
                Some(span),
                format!("echoes instruction-like text \"{what}\""),
                Fix::DropSentence,
            ));
        }
    }
    out
}

/// Words of 2+ letters, all in capitals, that stand alone (no digits attached).
fn caps_words(chars: &[char]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_alphanumeric() {
            i += 1;
            continue;
        }
        let s = i;
        while i < chars.len() && chars[i].is_alphanumeric() {
            i += 1;
        }
        let w = &chars[s..i];
        if w.len() >= 2
            && w.iter().all(|c| c.is_alphabetic() && c.is_uppercase())
            && !(s > 0 && chars[s - 1] == '#')
        {
            out.push((s, i));
        }
    }
    out
}

/// Char spans of the hashtags in a text.
pub fn hashtag_spans(t: &str) -> Vec<(usize, usize)> {
    let map = text::ByteToChar::new(t);
    HASHTAG
        .captures_iter(t)
        .filter_map(|c| c.get(1))
        .map(|m| (map.get(m.start()), map.get(m.end())))
        .collect()
}

/// List-level rules: duplicates (on the later item) and the hashtag count of a list of
/// hashtags. Returns (item, hit).
pub fn scan_items(
    r: &FieldRules,
    items: &[String],
    count_reported: bool,
) -> Vec<(Option<usize>, Hit)> {
    let mut out = Vec::new();
    if r.unique_items == Some(true) {
        for (i, j) in duplicates(items) {
            let len = items[j].chars().count();
            out.push((
                Some(j),
                Hit {
                    rule: "items.duplicate",
                    span: Some((0, len)),
                    message: format!("repeats item {}", i + 1),
                    fix: Fix::DropItem,
                },
            ));
        }
    }
    if !count_reported {
        let n = items.len();
        if let Some(max) = r.max_hashtags.filter(|m| n > *m) {
            out.push((
                None,
                Hit {
                    rule: "hashtag.count",
                    span: None,
                    message: format!("has {n} hashtags, at most {max} allowed"),
                    fix: Fix::None,
                },
            ));
        }
        if let Some(min) = r.min_hashtags.filter(|m| n < *m) {
            out.push((
                None,
                Hit {
                    rule: "hashtag.count",
                    span: None,
                    message: format!("has {n} hashtags, at least {min} needed"),
                    fix: Fix::None,
                },
            ));
        }
    }
    out
}

/// Pairs (earlier, later) of items that repeat each other: the same words ignoring case and
/// punctuation, or near-duplicates (edit similarity >= 0.9, or 80% shared words).
pub fn duplicates(items: &[String]) -> Vec<(usize, usize)> {
    let keys: Vec<String> = items.iter().map(|s| dup_key(s)).collect();
    let mut out = Vec::new();
    let mut dup_of: BTreeMap<usize, usize> = BTreeMap::new();
    for j in 0..keys.len() {
        for i in 0..j {
            if dup_of.contains_key(&i) {
                continue;
            }
            if near_duplicate(&keys[i], &keys[j]) {
                dup_of.insert(j, i);
                out.push((i, j));
                break;
            }
        }
    }
    out
}

fn near_duplicate(a: &str, b: &str) -> bool {
    if a.is_empty() || b.is_empty() {
        return a == b && !a.is_empty();
    }
    if a == b {
        return true;
    }
    if a.chars().count().max(b.chars().count()) >= 12 && strsim::normalized_levenshtein(a, b) >= 0.9
    {
        return true;
    }
    let wa: std::collections::BTreeSet<&str> = a.split(' ').collect();
    let wb: std::collections::BTreeSet<&str> = b.split(' ').collect();
    if wa.len() >= 4 && wb.len() >= 4 {
        let inter = wa.intersection(&wb).count() as f64;
        let union = wa.union(&wb).count() as f64;
        return inter / union >= 0.8;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{validate, Position};

    fn spec() -> ProductSpec {
        validate(
            serde_json::json!({"id": "p", "brand": "Seagate", "category": "Hard Drives",
                "attributes": {"Capacity": "1.5-TB", "Interface": "SATA", "Rotational Speed": "5900RPM",
                    "Part Number": "ST31500541AS", "Cache": "32MB"}}),
            Position::Single,
            &crate::config::InputLimits::default(),
        )
        .unwrap()
    }

    fn pack() -> RulePack {
        RulePack {
            version: "t".into(),
            ..Default::default()
        }
    }

    fn run(r: &FieldRules, lim: Limits, t: &str, item: bool) -> Vec<Hit> {
        let p = pack();
        let s = spec();
        let ctx = Ctx::new(&p, &s);
        scan(&ctx, r, lim, t, item)
    }

    fn rules_of(hits: &[Hit]) -> Vec<&'static str> {
        hits.iter().map(|h| h.rule).collect()
    }

    fn no_limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn length_min_max_and_recommended() {
        let r = FieldRules::default();
        let lim = Limits {
            min: Some(5),
            max: Some(10),
            warn: Some(8),
            counting: Counting::Chars,
        };
        assert_eq!(rules_of(&run(&r, lim, "abc", false)), ["length.min"]);
        let h = run(&r, lim, "abcdefghi", false);
        assert_eq!(rules_of(&h), ["length.recommended"]);
        assert_eq!(h[0].span, Some((8, 9)));
        let h = run(&r, lim, "äöüäöüäöüäöü", false);
        assert_eq!(rules_of(&h), ["length.max"]);
        assert_eq!(h[0].span, Some((10, 12)));
        assert_eq!(h[0].message, "is 12 characters, at most 10 allowed");
        // X counting: 6 CJK chars weigh 12
        let lim = Limits {
            max: Some(10),
            counting: Counting::X,
            ..Default::default()
        };
        let h = run(&r, lim, "日本語日本語", false);
        assert_eq!(rules_of(&h), ["length.max"]);
        assert_eq!(h[0].span, Some((5, 6)));
        assert!(run(&r, lim, "abcdefghij", false).is_empty());
    }

    #[test]
    fn forbidden_characters_and_emoji() {
        let r = FieldRules {
            forbidden_chars: Some("!$™".into()),
            no_emoji: Some(true),
            ..Default::default()
        };
        let h = run(&r, no_limits(), "Größe™ drive! Wow!! 👍🏽 ok", false);
        let got: Vec<_> = h.iter().map(|h| (h.rule, h.span)).collect();
        assert_eq!(
            got,
            [
                ("chars.forbidden", Some((5, 6))),
                ("chars.forbidden", Some((12, 13))),
                ("chars.forbidden", Some((20, 22))),
            ]
        );
        assert_eq!(h[2].message, "contains emoji \"👍🏽\"");
    }

    #[test]
    fn forbidden_phrases_at_word_boundaries() {
        let r = FieldRules {
            forbidden_phrases: vec!["free shipping".into(), "sale".into(), "#1".into()],
            ..Default::default()
        };
        let h = run(
            &r,
            no_limits(),
            "Wholesale drive, #1 pick, FREE Shipping on sale",
            false,
        );
        let got: Vec<_> = h.iter().map(|h| (h.span, h.message.as_str())).collect();
        assert_eq!(
            got,
            [
                (Some((26, 39)), "contains \"FREE Shipping\""),
                (Some((43, 47)), "contains \"sale\""),
                (Some((17, 19)), "contains \"#1\""),
            ]
        );
    }

    #[test]
    fn html_urls_emails_phones() {
        let r = FieldRules {
            no_html: Some(true),
            no_urls: Some(true),
            no_emails: Some(true),
            no_phones: Some(true),
            ..Default::default()
        };
        let t = "<b>Drive</b> &amp; more at www.shop.com or https://x.io/a, mail a.b@shop.com, call (555) 123-4567 or +44 20 7946 0958. 643770-B21 2.0GHz";
        let h = run(&r, no_limits(), t, false);
        let rules: Vec<_> = h
            .iter()
            .filter(|h| !h.rule.starts_with("grounding"))
            .map(|h| h.rule)
            .collect();
        assert_eq!(
            rules,
            [
                "html.tag",
                "html.tag",
                "html.tag",
                "contact.email",
                "contact.url",
                "contact.url",
                "contact.phone",
                "contact.phone"
            ]
        );
        let chars: Vec<char> = t.chars().collect();
        let urls: Vec<String> = h
            .iter()
            .filter(|h| h.rule == "contact.url")
            .map(|h| slice(&chars, h.span.unwrap().0, h.span.unwrap().1))
            .collect();
        assert_eq!(urls, ["www.shop.com", "https://x.io/a"]);
    }

    #[test]
    fn placeholders() {
        let r = FieldRules {
            no_placeholders: Some(true),
            ..Default::default()
        };
        for t in [
            "N/A",
            "Capacity: TBD",
            "Lorem ipsum dolor",
            "[brand] drive",
            "Model XXX",
            "{{name}}",
        ] {
            assert_eq!(
                rules_of(&run(&r, no_limits(), t, false)),
                ["placeholder.text"],
                "{t}"
            );
        }
        for t in ["Next-gen drive", "A nano coating", "Size XL"] {
            assert!(run(&r, no_limits(), t, false).is_empty(), "{t}");
        }
    }

    #[test]
    fn all_caps_words_outside_spec_and_acronyms() {
        let r = FieldRules {
            all_caps: Some(true),
            ..Default::default()
        };
        let h = run(
            &r,
            no_limits(),
            "AMAZING SATA drive with USB and HDD, ST31500541AS",
            false,
        );
        let words: Vec<_> = h.iter().map(|h| h.message.as_str()).collect();
        assert_eq!(words, ["\"AMAZING\" is in capitals"]);
        assert_eq!(h[0].span, Some((0, 7)));
    }

    #[test]
    fn hashtags_format_and_count() {
        let r = FieldRules {
            hashtag_format: Some(true),
            max_hashtags: Some(2),
            min_hashtags: Some(1),
            ..Default::default()
        };
        assert!(run(&r, no_limits(), "#Seagate", true).is_empty());
        for bad in ["#hard drive", "Seagate", "#", "#a-b", "##x"] {
            assert_eq!(
                rules_of(&run(&r, no_limits(), bad, true)),
                ["hashtag.format"],
                "{bad}"
            );
        }
        let h = run(&r, no_limits(), "Fast #Seagate #drive #storage now", false);
        assert_eq!(rules_of(&h), ["hashtag.count"]);
        assert_eq!(h[0].span, Some((21, 29)));
        let items: Vec<String> = ["#a", "#b", "#c"].iter().map(|s| s.to_string()).collect();
        let h = scan_items(&r, &items, false);
        assert_eq!(h.len(), 1);
        assert!(scan_items(&r, &items, true).is_empty());
    }

    #[test]
    fn capital_start() {
        let r = FieldRules {
            capital_start: Some(true),
            ..Default::default()
        };
        assert_eq!(
            rules_of(&run(&r, no_limits(), " über fast", true)),
            ["case.start"]
        );
        assert!(run(&r, no_limits(), "Über fast", true).is_empty());
        assert!(run(&r, no_limits(), "32MB cache", true).is_empty());
    }

    #[test]
    fn duplicate_items_exact_and_near() {
        let items: Vec<String> = [
            "Capacity: 1.5 TB of storage",
            "Fast 5900 RPM spindle speed",
            "capacity 1.5 TB of storage!",
            "Fast 5900 RPM spindle speeds",
            "Different fact entirely",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(duplicates(&items), [(0, 2), (1, 3)]);
        let r = FieldRules {
            unique_items: Some(true),
            ..Default::default()
        };
        let h = scan_items(&r, &items, false);
        assert_eq!(h[0].0, Some(2));
        assert_eq!(h[0].1.message, "repeats item 1");
    }

    #[test]
    fn commerce_claims() {
        let r = FieldRules {
            no_commerce_claims: Some(true),
            ..Default::default()
        };
        for (t, rule) in [
            ("Only $19.99 today", "claim.price"),
            ("Now 20% off", "claim.price"),
            ("Rs. 725 only", "claim.price"),
            ("Free delivery to your door", "claim.shipping"),
            ("Ships within 24 hours", "claim.shipping"),
            ("In stock and ready", "claim.availability"),
            ("Order now while supplies last", "claim.availability"),
        ] {
            let h = run(&r, no_limits(), t, false);
            assert!(h.iter().any(|h| h.rule == rule), "{t}: {h:?}");
        }
        assert!(run(
            &r,
            no_limits(),
            "USB power delivery for fast charging",
            false
        )
        .is_empty());
        // the spec names the product with the word: no claim
        let p = pack();
        let s = validate(
            serde_json::json!({"id": "t", "attributes": {"Product Type": "Shipping Tags"}}),
            Position::Single,
            &crate::config::InputLimits::default(),
        )
        .unwrap();
        let ctx = Ctx::new(&p, &s);
        assert!(scan(&ctx, &r, no_limits(), "Strung shipping tags", false).is_empty());
    }

    #[test]
    fn grounding_hits_name_the_claim_and_span() {
        let r = FieldRules::default();
        let t = "Seagate 1.5 TB drive, 5.9K RPM, 64MB cache, by Western Digital";
        let h = run(&r, no_limits(), t, false);
        let got: Vec<_> = h
            .iter()
            .map(|h| (h.rule, h.span, h.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "grounding.number",
                    Some((32, 36)),
                    "states number \"64MB\", which is not in the product data"
                ),
                (
                    "grounding.brand",
                    Some((47, 62)),
                    "names brand \"Western Digital\", which is not in the product data"
                ),
            ]
        );
    }

    #[test]
    fn grounding_can_be_switched_off_per_field() {
        let r = FieldRules {
            grounding: Some(false),
            ..Default::default()
        };
        assert!(run(&r, no_limits(), "64MB cache by Dell", false).is_empty());
    }
}
