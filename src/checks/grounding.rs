//! Grounding: whether the claims of a text are supported by the spec.
//!
//! The spec's facts (`ProductSpec::fact_texts`: brand, category, attribute names and values,
//! title, description) are read once into [`SpecFacts`]: normalised quantities, bare numbers,
//! the compacted tokens for part numbers, and the text for brand and certification look-ups.
//! A number is grounded when the spec has it in any normalised form; a part number when the
//! spec has it ignoring case and separators; a brand when it is the spec's brand (or one of its
//! aliases) or appears anywhere in the spec.

use std::{collections::HashSet, sync::LazyLock};

use regex::Regex;

use super::{
    claims::{self, Claim, ClaimKind, Quantity, System},
    text::{compact, find_phrase, is_word, slice},
    GroundingRules,
};
use crate::spec::{AttrValue, ProductSpec};

static THOUSANDS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(\d{1,3}),\s(\d{3})\b").expect("thousands regex"));

/// The spec's facts, ready for comparison.
#[derive(Debug, Clone, Default)]
pub struct SpecFacts {
    /// Numbers with a unit.
    quantities: Vec<Quantity>,
    /// Numbers without a unit (the attribute name often carries it: `Cores: 10`), and counts
    /// of list values.
    unitless: Vec<f64>,
    /// Every number as written, including those inside part numbers.
    digit_runs: Vec<f64>,
    /// Item counts of list values.
    counts: Vec<f64>,
    /// Compacted tokens, their separator-split parts and 2-3 token concatenations.
    keys: HashSet<String>,
    compact_all: String,
    /// All fact texts, one per line (for phrase look-ups).
    text: Vec<char>,
    brand_key: Option<String>,
    /// Words written in capitals in the spec.
    caps_words: HashSet<String>,
    ignore_bare_below: f64,
}

impl SpecFacts {
    pub fn new(spec: &ProductSpec, certs: &[String], rules: &GroundingRules) -> Self {
        let texts = spec.fact_texts();
        let mut f = SpecFacts {
            brand_key: spec.brand.as_deref().map(compact).filter(|k| !k.is_empty()),
            ignore_bare_below: rules.ignore_bare_below,
            ..Default::default()
        };
        for t in &texts {
            let found = claims::extract(t, certs);
            let chars: Vec<char> = t.chars().collect();
            // `2x2GB` also states 4GB
            for pair in found.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                let between = slice(&chars, a.span.1, b.span.0);
                if let (Some(qa), Some(qb)) = (a.quantity, b.quantity) {
                    if qa.dim.is_none()
                        && qb.dim.is_some()
                        && matches!(between.trim(), "x" | "X" | "×")
                    {
                        f.quantities.push(Quantity {
                            value: qa.raw * qb.value,
                            raw: qa.raw * qb.raw,
                            ..qb
                        });
                    }
                }
            }
            // `10, 000` (a spaced thousands separator) is 10000
            for c in THOUSANDS.captures_iter(t) {
                if let (Some(a), Some(b)) = (c.get(1), c.get(2)) {
                    if let Ok(v) = format!("{}{}", a.as_str(), b.as_str()).parse::<f64>() {
                        f.unitless.push(v);
                    }
                }
            }
            for c in found {
                if let Some(q) = c.quantity {
                    if q.dim.is_some() {
                        f.quantities.push(q);
                    } else {
                        f.unitless.push(q.value);
                        f.unitless.push(q.raw);
                    }
                }
            }
            f.digit_runs.extend(claims::digit_runs(t));
            let ws = claims::words(&chars);
            let keys: Vec<String> = ws
                .iter()
                .map(|w| compact(&slice(&chars, w.start, w.end)))
                .collect();
            for (i, w) in ws.iter().enumerate() {
                f.keys.insert(keys[i].clone());
                let word = slice(&chars, w.start, w.end);
                for part in word.split(|c: char| !is_word(c)).filter(|p| !p.is_empty()) {
                    f.keys.insert(compact(part));
                }
                if i + 1 < keys.len() {
                    f.keys.insert(format!("{}{}", keys[i], keys[i + 1]));
                }
                if i + 2 < keys.len() {
                    f.keys
                        .insert(format!("{}{}{}", keys[i], keys[i + 1], keys[i + 2]));
                }
            }
            for w in t.split(|c: char| !c.is_alphabetic()) {
                if w.chars().count() >= 2 && w.chars().all(|c| !c.is_lowercase()) {
                    f.caps_words.insert(w.to_string());
                }
            }
            f.compact_all.push_str(&compact(t));
            f.compact_all.push(' ');
            f.text.extend(t.chars());
            f.text.push('\n');
        }
        // "available in 3 colours" when the spec lists three colours
        for (_, v) in &spec.attributes {
            let n = match v {
                AttrValue::List(items) => items.len(),
                AttrValue::Text(s) => {
                    let parts: Vec<&str> = s.split([',', ';', '|']).collect();
                    if parts.iter().all(|p| p.chars().any(char::is_alphabetic)) {
                        parts.len()
                    } else {
                        0
                    }
                }
                _ => 0,
            };
            if n >= 2 {
                f.counts.push(n as f64);
            }
        }
        f
    }

    /// Whether the claim is supported by the spec.
    pub fn grounded(&self, c: &Claim) -> bool {
        match c.kind {
            ClaimKind::PartNumber | ClaimKind::Certification => self.key_grounded(&c.key),
            ClaimKind::Number | ClaimKind::Year | ClaimKind::Percent => match c.quantity {
                Some(q) => self.number_grounded(&q),
                None => true,
            },
        }
    }

    /// A part number (or other token) the spec has, ignoring case and separators.
    pub fn key_grounded(&self, key: &str) -> bool {
        key.is_empty()
            || self.keys.contains(key)
            || (key.chars().count() >= 6 && self.compact_all.contains(key))
    }

    pub fn number_grounded(&self, q: &Quantity) -> bool {
        let eq = |a: f64, b: f64| claims::same_value(a, b, claims::EXACT);
        match q.dim {
            Some(dim) => {
                let counted = matches!(dim, claims::Dim::Count(_))
                    && self.counts.iter().any(|&c| eq(c, q.value));
                counted
                    || self.quantities.iter().any(|s| {
                        s.dim == Some(dim) && {
                            let tol = if s.system != q.system
                                && s.system != System::Neutral
                                && q.system != System::Neutral
                            {
                                claims::CONVERTED
                            } else {
                                claims::EXACT
                            };
                            claims::same_value(s.value, q.value, tol)
                        }
                    })
                    || self
                        .unitless
                        .iter()
                        .any(|&u| eq(u, q.raw) || eq(u, q.value))
            }
            None => {
                q.value < self.ignore_bare_below
                    || self
                        .quantities
                        .iter()
                        .any(|s| eq(s.raw, q.raw) || eq(s.value, q.value))
                    || self
                        .unitless
                        .iter()
                        .chain(self.digit_runs.iter())
                        .chain(self.counts.iter())
                        .any(|&u| eq(u, q.raw) || eq(u, q.value))
            }
        }
    }

    /// Whether `word` (as written, in capitals) appears in the spec in capitals.
    pub fn has_caps_word(&self, word: &str) -> bool {
        self.caps_words.contains(word)
    }

    /// Whether the spec text contains `phrase` (case-insensitive, at word boundaries).
    pub fn mentions(&self, phrase: &str) -> bool {
        !find_phrase(&self.text, phrase).is_empty()
    }

    /// Whether any of `names` is the spec's brand or appears in the spec text.
    pub fn names_any(&self, names: &[String]) -> bool {
        names.iter().any(|n| {
            let k = compact(n);
            (!k.is_empty() && self.brand_key.as_deref() == Some(k.as_str()))
                || !find_phrase(&self.text, n).is_empty()
        })
    }
}

static NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\d+(?:[.,]\d+)*").expect("number regex"));

/// The numbers of the spec's facts as written (`2.00`, `24`, `643770`, `1,500`), sorted and
/// without repeats: for a provider's grounded decoding (`GenerateRequest::allowed_numbers`).
pub fn spec_numbers(spec: &ProductSpec) -> Vec<String> {
    let mut out: Vec<String> = spec
        .fact_texts()
        .iter()
        .flat_map(|t| {
            NUMBER
                .find_iter(t)
                .map(|m| m.as_str().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A modest built-in list of brands: electronics, computing, home, kitchen, tools, fashion.
/// Names that are also common words or units (Sharp, Brother, Prestige, Crucial, Micron,
/// Gigabyte, Titan, Ring, Nest, ...) are left out; channels can add them (`extra_brands`).
pub const DEFAULT_BRANDS: &[&str] = &[
    // computing and electronics
    "Apple",
    "Samsung",
    "Sony",
    "LG",
    "HP",
    "Hewlett-Packard",
    "Hewlett Packard",
    "HPE",
    "Dell",
    "Lenovo",
    "Asus",
    "Acer",
    "Microsoft",
    "Intel",
    "AMD",
    "Nvidia",
    "Qualcomm",
    "MediaTek",
    "Seagate",
    "Western Digital",
    "WD",
    "Toshiba",
    "Kingston",
    "SanDisk",
    "Hitachi",
    "HGST",
    "Fujitsu",
    "IBM",
    "Cisco",
    "Netgear",
    "TP-Link",
    "D-Link",
    "Linksys",
    "Ubiquiti",
    "Logitech",
    "Razer",
    "Corsair",
    "SteelSeries",
    "HyperX",
    "Canon",
    "Nikon",
    "Fujifilm",
    "Olympus",
    "Panasonic",
    "Philips",
    "JBL",
    "Bose",
    "Sennheiser",
    "Skullcandy",
    "Jabra",
    "Garmin",
    "Fitbit",
    "GoPro",
    "DJI",
    "Nintendo",
    "PlayStation",
    "Xbox",
    "Motorola",
    "Nokia",
    "OnePlus",
    "Xiaomi",
    "Huawei",
    "Oppo",
    "Realme",
    "Google",
    "Epson",
    "Xerox",
    "Kodak",
    "Lexmark",
    "Ricoh",
    "Kyocera",
    "Hisense",
    "TCL",
    "Vizio",
    "Sanyo",
    "Kenwood",
    "Yamaha",
    "Denon",
    "Marantz",
    "Onkyo",
    "Belkin",
    "Anker",
    "Sony Ericsson",
    "BlackBerry",
    "Alcatel",
    "ZTE",
    "Micromax",
    "Karbonn",
    "Zebronics",
    "Synology",
    "QNAP",
    "Supermicro",
    "MSI",
    "ASRock",
    "EVGA",
    "Zotac",
    "Viewsonic",
    "BenQ",
    "AOC",
    "Eizo",
    "Brocade",
    "Emulex",
    "QLogic",
    "Broadcom",
    "Adaptec",
    "Marvell",
    "Tripp Lite",
    "APC",
    "Eaton",
    "Duracell",
    "Energizer",
    // home, kitchen and tools
    "Bosch",
    "Siemens",
    "Whirlpool",
    "Electrolux",
    "Miele",
    "Dyson",
    "iRobot",
    "KitchenAid",
    "Cuisinart",
    "Breville",
    "Braun",
    "De'Longhi",
    "DeLonghi",
    "Nespresso",
    "Keurig",
    "Tefal",
    "T-fal",
    "Rowenta",
    "Krups",
    "Hamilton Beach",
    "Black+Decker",
    "Black & Decker",
    "DeWalt",
    "Makita",
    "Ryobi",
    "Milwaukee",
    "Bissell",
    "Vitamix",
    "Instant Pot",
    "Le Creuset",
    "Pyrex",
    "Tupperware",
    "Bajaj",
    "Havells",
    "Morphy Richards",
    "Godrej",
    "Voltas",
    "Haier",
    "Kenstar",
    "Crompton",
    "Syska",
    "Borosil",
    "Hawkins",
    "Ikea",
    "Simplehuman",
    "OXO",
    "Zwilling",
    "Wusthof",
    "Victorinox",
    "Brita",
    "Honeywell",
    "Rubbermaid",
    "3M",
    // fashion, footwear, jewellery
    "Nike",
    "Adidas",
    "Puma",
    "Reebok",
    "Under Armour",
    "New Balance",
    "Asics",
    "Skechers",
    "Fila",
    "Levi's",
    "Levis",
    "Wrangler",
    "Lee Cooper",
    "Zara",
    "H&M",
    "Uniqlo",
    "Gucci",
    "Prada",
    "Louis Vuitton",
    "Chanel",
    "Versace",
    "Armani",
    "Burberry",
    "Ralph Lauren",
    "Tommy Hilfiger",
    "Calvin Klein",
    "Lacoste",
    "Hugo Boss",
    "Michael Kors",
    "Ray-Ban",
    "Oakley",
    "Casio",
    "Timex",
    "Fastrack",
    "Rolex",
    "Seiko",
    "Swarovski",
    "Pandora",
    "Clarks",
    "Allen Solly",
    "Van Heusen",
    "Peter England",
    "Louis Philippe",
    "Jockey",
    "Fabindia",
    "Manyavar",
];

/// Names of one brand: (`HP`, `Hewlett-Packard`, `HPE`) name the same company.
const DEFAULT_ALIASES: &[&[&str]] = &[
    &[
        "HP",
        "Hewlett-Packard",
        "Hewlett Packard",
        "HPE",
        "Hewlett Packard Enterprise",
    ],
    &["WD", "Western Digital"],
    &["Black+Decker", "Black & Decker", "Black and Decker"],
    &["De'Longhi", "DeLonghi"],
    &["T-fal", "Tefal"],
    &["Levi's", "Levis", "Levi Strauss"],
    &["Hitachi", "HGST"],
    &["LG", "LG Electronics"],
    &["Sony", "Sony Ericsson"],
    &["PlayStation", "Sony"],
    &["Xbox", "Microsoft"],
];

/// The brands a channel looks for.
#[derive(Debug, Clone)]
pub struct Brands {
    names: Vec<String>,
    /// The names case-folded (a quick pre-filter before the word-boundary search).
    folded: Vec<String>,
    aliases: Vec<Vec<String>>,
}

impl Brands {
    pub fn new(rules: &GroundingRules) -> Self {
        let ignored = |n: &str| {
            rules
                .ignore_brands
                .iter()
                .any(|i| i.eq_ignore_ascii_case(n))
        };
        let mut names: Vec<String> = DEFAULT_BRANDS
            .iter()
            .map(|s| s.to_string())
            .chain(rules.extra_brands.iter().cloned())
            .filter(|n| !ignored(n) && !n.trim().is_empty())
            .collect();
        names.sort();
        names.dedup();
        let mut aliases: Vec<Vec<String>> = DEFAULT_ALIASES
            .iter()
            .map(|g| g.iter().map(|s| s.to_string()).collect())
            .collect();
        aliases.extend(rules.brand_aliases.iter().cloned());
        // the first word: a space in a name also matches a hyphen (`Western-Digital`)
        let folded = names
            .iter()
            .map(|n| {
                n.split_whitespace()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .map(super::text::fold)
                    .collect()
            })
            .collect();
        Self {
            names,
            folded,
            aliases,
        }
    }

    /// The brand names in `chars` (capitalised as a name: first letter upper case, and brands
    /// written in capitals must be in capitals), outside the `skip` spans (e.g. `5 HP` is
    /// horsepower). Longer names win over names inside them.
    pub fn find(&self, chars: &[char], skip: &[(usize, usize)]) -> Vec<(usize, usize, String)> {
        let mut out: Vec<(usize, usize, String)> = Vec::new();
        let folded: String = chars.iter().map(|c| super::text::fold(*c)).collect();
        for (name, key) in self.names.iter().zip(&self.folded) {
            if !folded.contains(key.as_str()) {
                continue;
            }
            // `HP` and `iRobot` are matched as written; `Seagate` also as `SEAGATE`.
            let exact = name
                .chars()
                .filter(|c| c.is_alphabetic())
                .all(|c| c.is_uppercase())
                || name.chars().next().is_some_and(|c| c.is_lowercase());
            for (s, e) in find_phrase(chars, name) {
                let written = slice(chars, s, e);
                if exact && written != *name {
                    continue;
                }
                if !exact && !written.chars().next().is_some_and(|c| c.is_uppercase()) {
                    continue;
                }
                if skip.iter().any(|&(a, b)| s < b && a < e) {
                    continue;
                }
                out.push((s, e, name.clone()));
            }
        }
        // keep the longest of overlapping matches
        out.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let mut kept: Vec<(usize, usize, String)> = Vec::new();
        for m in out {
            if kept.last().is_some_and(|k| m.0 < k.1) {
                continue;
            }
            kept.push(m);
        }
        kept
    }

    /// The names of `brand`'s company (itself and its aliases).
    pub fn names_of(&self, brand: &str) -> Vec<String> {
        let key = compact(brand);
        let mut out = vec![brand.to_string()];
        for g in &self.aliases {
            if g.iter().any(|n| compact(n) == key) {
                out.extend(g.iter().cloned());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{validate, Position};

    fn spec(v: serde_json::Value) -> ProductSpec {
        validate(v, Position::Single, &crate::config::InputLimits::default()).unwrap()
    }

    fn facts(s: &ProductSpec) -> SpecFacts {
        let certs: Vec<String> = claims::DEFAULT_CERTIFICATIONS
            .iter()
            .map(|s| s.to_string())
            .collect();
        SpecFacts::new(s, &certs, &GroundingRules::default())
    }

    fn ungrounded(f: &SpecFacts, text: &str) -> Vec<String> {
        let certs: Vec<String> = claims::DEFAULT_CERTIFICATIONS
            .iter()
            .map(|s| s.to_string())
            .collect();
        claims::extract(text, &certs)
            .into_iter()
            .filter(|c| !f.grounded(c))
            .map(|c| c.text)
            .collect()
    }

    fn hp() -> ProductSpec {
        spec(
            serde_json::json!({"id": "1", "brand": "HP", "category": "Computers",
            "attributes": {"Part Number": "643770-B21", "Cache": "24MB",
                "Processor Type": "Intel Xeon E7-4850", "Processor Core": "10-core",
                "Clock Speed": "2.00GHz", "Thermal Design Power": "130W",
                "Capacity": "1.5-TB", "Rotational Speed": "5900RPM", "Width": "47 1/4\"",
                "Colors": ["Red", "Blue", "Green"], "Cores": "12"}}),
        )
    }

    #[test]
    fn normalised_numbers_are_grounded() {
        let f = facts(&hp());
        let ok = "2.0GHz, 2 GHz, 2000 MHz, 10 cores, 24 MB, 130 W, 1.5 TB, 1500GB, \
                  5.9K RPM, 5900 rpm, 47.25 inches, 120 cm, 12-core, 3 colours, E74850, \
                  643770B21, Xeon E7, 2.00, one";
        assert!(ungrounded(&f, ok).is_empty(), "{:?}", ungrounded(&f, ok));
        let bad = "3.0GHz, 16 cores, 48MB, 2 TB, 7200 RPM, 2019, 20%, ST31500541AS, 8 GB";
        assert_eq!(
            ungrounded(&f, bad),
            [
                "3.0GHz",
                "16 cores",
                "48MB",
                "2 TB",
                "7200 RPM",
                "2019",
                "20%",
                "ST31500541AS",
                "8 GB"
            ]
        );
    }

    #[test]
    fn same_number_with_another_unit_is_not_grounded() {
        let f = facts(&hp());
        // 24 is in the spec as 24MB, not as 24 GB
        assert_eq!(ungrounded(&f, "24 GB of RAM"), ["24 GB"]);
        // a bare 24 is fine
        assert!(ungrounded(&f, "24 of them").is_empty());
    }

    #[test]
    fn spec_numbers_as_written() {
        assert_eq!(
            spec_numbers(&hp()),
            [
                "1", "1.5", "10", "12", "130", "2.00", "21", "24", "4", "47", "4850", "5900",
                "643770", "7"
            ]
        );
    }

    #[test]
    fn certifications_need_the_spec() {
        let s = spec(serde_json::json!({"id": "1", "attributes": {
            "Certifications": "ENERGY STAR certified, ISO-9001", "Plug": "CE marked"}}));
        let f = facts(&s);
        assert!(ungrounded(&f, "Energy Star and CE, made under ISO 9001").is_empty());
        assert_eq!(
            ungrounded(&f, "UL listed, FDA approved, ISO 14001"),
            ["UL", "FDA", "ISO 14001"]
        );
    }

    #[test]
    fn two_in_one_only_when_the_spec_says_so() {
        let s = spec(serde_json::json!({"id": "1", "attributes": {"Type": "2-in-1 laptop"}}));
        assert!(ungrounded(&facts(&s), "A 2-in-1 design").is_empty());
        assert!(ungrounded(&facts(&s), "A 2 in 1 design").is_empty());
        let s = spec(serde_json::json!({"id": "1", "attributes": {"Type": "laptop"}}));
        assert_eq!(ungrounded(&facts(&s), "A 2-in-1 design"), ["2-in-1"]);
    }

    #[test]
    fn brands_other_than_the_specs_are_found() {
        let b = Brands::new(&GroundingRules::default());
        let f = facts(&hp());
        let t = "HP kit with Intel Xeon, not a Samsung or Dell part; 5 HP motor; apple pie";
        let chars: Vec<char> = t.chars().collect();
        let found: Vec<String> = b.find(&chars, &[]).into_iter().map(|m| m.2).collect();
        assert_eq!(found, ["HP", "Intel", "Samsung", "Dell", "HP"]);
        let ungrounded: Vec<String> = found
            .into_iter()
            .filter(|n| !f.names_any(&b.names_of(n)))
            .collect();
        assert_eq!(ungrounded, ["Samsung", "Dell"]);
        let chars: Vec<char> = "Western-Digital and WESTERN DIGITAL drives"
            .chars()
            .collect();
        assert_eq!(b.find(&chars, &[]).len(), 2);
        // Hewlett-Packard and HP are one company
        let s = spec(
            serde_json::json!({"id": "1", "brand": "Hewlett-Packard", "attributes": {"a": "b"}}),
        );
        assert!(facts(&s).names_any(&b.names_of("HP")));
        assert!(!facts(&s).names_any(&b.names_of("Dell")));
    }
}
