//! Extraction of factual claims from text, and the normaliser that makes them comparable.
//!
//! A claim is a number (with or without a unit), a year, a percentage, a model or part
//! number (a token mixing letters and digits), or a certification. Numbers are normalised to
//! a canonical value per dimension: `2.0GHz`, `2 GHz` and `2000 MHz` are all 2e9 Hz;
//! `1.5-TB` and `1500 GB` are 1.5e12 bytes; `47 1/4"` is 47.25 in (1200.15 mm); `5.9K RPM` is
//! 5900 rpm; `10-core` and `10 cores` are 10 cores. Units are case-insensitive; thousands
//! separators and fractions (`1/4`, `¼`) are read.

use std::sync::LazyLock;

use super::text::{compact, fold, is_word, slice};

/// What a quantity measures. Values of one dimension are comparable after normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Bytes,
    /// Data rate (bits and bytes per second are not told apart: units are case-insensitive).
    Rate,
    Hertz,
    Rpm,
    Watt,
    Volt,
    Ampere,
    /// mAh
    Charge,
    /// Wh
    Energy,
    HorsePower,
    /// Millimetres.
    Length,
    /// Grams.
    Mass,
    /// Millilitres.
    Volume,
    /// Seconds.
    Time,
    Percent,
    Celsius,
    Fahrenheit,
    Angle,
    Decibel,
    Megapixel,
    Lumen,
    Nit,
    Dpi,
    Fps,
    /// Video lines (`1080p`).
    Lines,
    /// A counted thing: `10-core`, `4 ports`, `5-pack`.
    Count(&'static str),
}

/// Unit system; conversions between metric and imperial are compared with a tolerance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Neutral,
    Metric,
    Imperial,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attach {
    /// May follow the number after a space or hyphen.
    Free,
    /// Only directly after the number (or after a hyphen): `5m`, `2A`, `15in`.
    Only,
    /// Directly, or after a space when written in capitals: `130W`, `130 W`.
    UpperSpaced,
}

struct UnitDef {
    names: &'static [&'static str],
    dim: Dim,
    factor: f64,
    system: System,
    attach: Attach,
}

const fn u(names: &'static [&'static str], dim: Dim, factor: f64) -> UnitDef {
    UnitDef {
        names,
        dim,
        factor,
        system: System::Neutral,
        attach: Attach::Free,
    }
}

const fn metric(names: &'static [&'static str], dim: Dim, factor: f64) -> UnitDef {
    UnitDef {
        names,
        dim,
        factor,
        system: System::Metric,
        attach: Attach::Free,
    }
}

const fn imperial(names: &'static [&'static str], dim: Dim, factor: f64) -> UnitDef {
    UnitDef {
        names,
        dim,
        factor,
        system: System::Imperial,
        attach: Attach::Free,
    }
}

const fn attach(mut d: UnitDef, a: Attach) -> UnitDef {
    d.attach = a;
    d
}

use Dim::*;

static UNITS: &[UnitDef] = &[
    u(&["byte", "bytes"], Bytes, 1.0),
    u(&["kb", "kilobyte", "kilobytes", "kib"], Bytes, 1e3),
    u(&["mb", "megabyte", "megabytes", "mib"], Bytes, 1e6),
    u(&["gb", "gigabyte", "gigabytes", "gib"], Bytes, 1e9),
    u(&["tb", "terabyte", "terabytes", "tib"], Bytes, 1e12),
    u(&["pb", "petabyte", "petabytes"], Bytes, 1e15),
    u(&["bps", "b/s", "bit/s"], Rate, 1.0),
    u(&["kbps", "kb/s", "kbit/s"], Rate, 1e3),
    u(&["mbps", "mb/s", "mbit/s"], Rate, 1e6),
    u(&["gbps", "gb/s", "gbit/s"], Rate, 1e9),
    u(&["hz", "hertz"], Hertz, 1.0),
    u(&["khz"], Hertz, 1e3),
    u(&["mhz"], Hertz, 1e6),
    u(&["ghz"], Hertz, 1e9),
    u(&["rpm", "r/min"], Rpm, 1.0),
    attach(u(&["w"], Watt, 1.0), Attach::UpperSpaced),
    u(&["watt", "watts"], Watt, 1.0),
    u(&["kw", "kilowatt", "kilowatts"], Watt, 1e3),
    attach(u(&["v"], Volt, 1.0), Attach::UpperSpaced),
    u(&["volt", "volts", "vac", "vdc"], Volt, 1.0),
    u(&["kv"], Volt, 1e3),
    u(&["mv"], Volt, 1e-3),
    attach(u(&["a"], Ampere, 1.0), Attach::Only),
    u(&["amp", "amps", "ampere", "amperes"], Ampere, 1.0),
    u(&["ma", "milliamp", "milliamps"], Ampere, 1e-3),
    u(&["mah"], Charge, 1.0),
    u(&["ah"], Charge, 1e3),
    u(&["wh"], Energy, 1.0),
    u(&["kwh"], Energy, 1e3),
    u(&["hp", "horsepower"], HorsePower, 1.0),
    metric(
        &[
            "mm",
            "millimeter",
            "millimeters",
            "millimetre",
            "millimetres",
        ],
        Length,
        1.0,
    ),
    metric(
        &[
            "cm",
            "centimeter",
            "centimeters",
            "centimetre",
            "centimetres",
        ],
        Length,
        10.0,
    ),
    attach(metric(&["m"], Length, 1000.0), Attach::Only),
    metric(
        &["meter", "meters", "metre", "metres", "mtr", "mtrs"],
        Length,
        1000.0,
    ),
    metric(
        &["km", "kilometer", "kilometers", "kilometre", "kilometres"],
        Length,
        1e6,
    ),
    attach(
        imperial(&["in", "in.", "\"", "″", "''", "”"], Length, 25.4),
        Attach::Only,
    ),
    imperial(&["inch", "inches"], Length, 25.4),
    attach(imperial(&["'", "′", "’"], Length, 304.8), Attach::Only),
    imperial(&["ft", "feet", "foot"], Length, 304.8),
    imperial(&["yd", "yds", "yard", "yards"], Length, 914.4),
    metric(&["mg", "milligram", "milligrams"], Mass, 1e-3),
    attach(metric(&["g"], Mass, 1.0), Attach::Only),
    metric(&["gm", "gms", "gram", "grams", "gr"], Mass, 1.0),
    metric(
        &["kg", "kgs", "kilogram", "kilograms", "kilo", "kilos"],
        Mass,
        1e3,
    ),
    imperial(&["oz", "ounce", "ounces"], Mass, 28.349_523_125),
    imperial(&["lb", "lbs", "pound", "pounds"], Mass, 453.592_37),
    metric(
        &[
            "ml",
            "milliliter",
            "milliliters",
            "millilitre",
            "millilitres",
            "cc",
        ],
        Volume,
        1.0,
    ),
    metric(&["cl"], Volume, 10.0),
    attach(metric(&["l"], Volume, 1000.0), Attach::UpperSpaced),
    metric(
        &["ltr", "ltrs", "liter", "liters", "litre", "litres"],
        Volume,
        1000.0,
    ),
    imperial(
        &["fl oz", "fl. oz", "fl.oz", "floz"],
        Volume,
        29.573_529_562_5,
    ),
    imperial(&["gal", "gallon", "gallons"], Volume, 3_785.411_784),
    imperial(
        &[
            "cu ft",
            "cu. ft",
            "cu. ft.",
            "cu.ft",
            "cu.ft.",
            "cubic feet",
            "cubic foot",
            "ft3",
            "ft³",
        ],
        Volume,
        28_316.846_592,
    ),
    imperial(
        &[
            "cu in",
            "cu. in",
            "cu. in.",
            "cubic inch",
            "cubic inches",
            "in3",
            "in³",
        ],
        Volume,
        16.387_064,
    ),
    metric(
        &[
            "cubic meter",
            "cubic meters",
            "cubic metre",
            "cubic metres",
            "m3",
            "m³",
        ],
        Volume,
        1e6,
    ),
    u(&["ms", "millisecond", "milliseconds"], Time, 1e-3),
    attach(u(&["s"], Time, 1.0), Attach::Only),
    u(&["sec", "secs", "second", "seconds"], Time, 1.0),
    u(&["min", "mins", "minute", "minutes"], Time, 60.0),
    attach(u(&["h"], Time, 3600.0), Attach::Only),
    u(&["hr", "hrs", "hour", "hours"], Time, 3600.0),
    u(&["day", "days"], Time, 86_400.0),
    u(&["week", "weeks", "wk", "wks"], Time, 604_800.0),
    u(&["month", "months", "mo", "mos"], Time, 2_629_800.0),
    u(&["year", "years", "yr", "yrs"], Time, 31_557_600.0),
    u(&["%", "percent", "per cent", "pct"], Percent, 1.0),
    u(
        &["°c", "℃", "degrees c", "deg c", "degrees celsius"],
        Celsius,
        1.0,
    ),
    u(
        &["°f", "℉", "degrees f", "deg f", "degrees fahrenheit"],
        Fahrenheit,
        1.0,
    ),
    u(&["°", "degree", "degrees", "deg"], Angle, 1.0),
    u(&["db", "dba", "decibel", "decibels"], Decibel, 1.0),
    u(&["mp", "megapixel", "megapixels"], Megapixel, 1.0),
    u(&["lm", "lumen", "lumens"], Lumen, 1.0),
    u(&["nit", "nits"], Nit, 1.0),
    u(&["dpi"], Dpi, 1.0),
    u(&["fps"], Fps, 1.0),
    attach(u(&["p"], Lines, 1.0), Attach::Only),
    u(&["core", "cores"], Count("core"), 1.0),
    u(&["thread", "threads"], Count("thread"), 1.0),
    u(&["port", "ports"], Count("port"), 1.0),
    u(&["bay", "bays"], Count("bay"), 1.0),
    u(&["slot", "slots"], Count("slot"), 1.0),
    u(&["pack", "pk", "packs"], Count("pack"), 1.0),
    u(&["pcs", "pc.", "piece", "pieces"], Count("piece"), 1.0),
    u(&["outlet", "outlets"], Count("outlet"), 1.0),
    u(&["seater"], Count("seater"), 1.0),
    u(&["burner", "burners"], Count("burner"), 1.0),
    u(&["ply"], Count("ply"), 1.0),
    u(&["layer", "layers"], Count("layer"), 1.0),
    u(&["speed", "speeds"], Count("speed"), 1.0),
    u(&["channel", "channels"], Count("channel"), 1.0),
    u(&["shelf", "shelves"], Count("shelf"), 1.0),
    u(&["drawer", "drawers"], Count("drawer"), 1.0),
];

/// Unit spellings, longest first: (folded chars, index into UNITS).
static SPELLINGS: LazyLock<Vec<(Vec<char>, usize)>> = LazyLock::new(|| {
    let mut v: Vec<(Vec<char>, usize)> = UNITS
        .iter()
        .enumerate()
        .flat_map(|(i, d)| {
            d.names
                .iter()
                .map(move |n| (n.chars().map(fold).collect(), i))
        })
        .collect();
    v.sort_by_key(|x| std::cmp::Reverse(x.0.len()));
    v
});

/// A number read from text, normalised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantity {
    /// The number in the dimension's base unit (`2.0GHz` -> 2e9), multipliers applied.
    pub value: f64,
    /// The number as written, fractions and thousands separators read (`5.9K` -> 5.9).
    pub raw: f64,
    pub dim: Option<Dim>,
    pub system: System,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimKind {
    Number,
    Year,
    Percent,
    PartNumber,
    Certification,
}

impl ClaimKind {
    /// The finding rule id for an unsupported claim of this kind.
    pub fn rule(self) -> &'static str {
        match self {
            ClaimKind::Number => "grounding.number",
            ClaimKind::Year => "grounding.year",
            ClaimKind::Percent => "grounding.percent",
            ClaimKind::PartNumber => "grounding.part_number",
            ClaimKind::Certification => "grounding.certification",
        }
    }
}

/// One factual claim found in a text.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub kind: ClaimKind,
    /// Char range `[start, end)` in the text.
    pub span: (usize, usize),
    pub text: String,
    pub quantity: Option<Quantity>,
    /// Letters and digits, lowercased (for part numbers and certifications).
    pub key: String,
}

/// A token: a run of letters and digits, joined across `-` (between letters or digits), `.`
/// and `/` (between digits) and `,` (a thousands separator).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Word {
    pub start: usize,
    pub end: usize,
    pub has_digit: bool,
    pub has_alpha: bool,
}

pub(crate) fn words(chars: &[char]) -> Vec<Word> {
    let n = chars.len();
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        if !is_word(chars[i]) {
            i += 1;
            continue;
        }
        let start = i;
        i += 1;
        loop {
            if i < n && is_word(chars[i]) {
                i += 1;
                continue;
            }
            if i + 1 < n && i > start && is_word(chars[i + 1]) {
                let (p, c, nx) = (chars[i - 1], chars[i], chars[i + 1]);
                let joined = match c {
                    '-' => true,
                    '.' => p.is_ascii_digit() && nx.is_ascii_digit(),
                    '/' => p.is_ascii_digit() && nx.is_ascii_digit(),
                    ',' => {
                        p.is_ascii_digit()
                            && i + 3 < n
                            && chars[i + 1..i + 4].iter().all(|c| c.is_ascii_digit())
                            && (i + 4 >= n || !chars[i + 4].is_ascii_digit())
                    }
                    _ => false,
                };
                if joined {
                    i += 2;
                    continue;
                }
            }
            break;
        }
        let w = &chars[start..i];
        out.push(Word {
            start,
            end: i,
            has_digit: w.iter().any(|c| c.is_numeric()),
            has_alpha: w.iter().any(|c| c.is_alphabetic()),
        });
    }
    out
}

fn vulgar(c: char) -> Option<f64> {
    Some(match c {
        '½' => 0.5,
        '¼' => 0.25,
        '¾' => 0.75,
        '⅓' => 1.0 / 3.0,
        '⅔' => 2.0 / 3.0,
        '⅕' => 0.2,
        '⅛' => 0.125,
        '⅜' => 0.375,
        '⅝' => 0.625,
        '⅞' => 0.875,
        _ => return None,
    })
}

fn digits(chars: &[char], i: usize) -> usize {
    let mut j = i;
    while j < chars.len() && chars[j].is_ascii_digit() {
        j += 1;
    }
    j
}

/// `a/b` at `i` (digits, slash, digits, not followed by a digit). Returns value and end.
fn fraction(chars: &[char], i: usize) -> Option<(f64, usize)> {
    let j = digits(chars, i);
    if j == i || j >= chars.len() || chars[j] != '/' {
        return None;
    }
    let k = digits(chars, j + 1);
    if k == j + 1 {
        return None;
    }
    let num: f64 = slice(chars, i, j).parse().ok()?;
    let den: f64 = slice(chars, j + 1, k).parse().ok()?;
    (den != 0.0).then_some((num / den, k))
}

/// A number at `i`: digits with thousands separators and decimals, a fraction (`1/4`), a
/// mixed number (`47 1/4`, `47-1/4`, `47¼`). Returns the value and the end.
pub fn parse_number(chars: &[char], i: usize) -> Option<(f64, usize)> {
    let n = chars.len();
    if i >= n || !chars[i].is_ascii_digit() {
        return None;
    }
    if let Some(f) = fraction(chars, i) {
        return Some(f);
    }
    let mut j = digits(chars, i);
    let mut s: String = slice(chars, i, j);
    let mut plain_int = true;
    if j - i <= 3 {
        while j + 3 < n
            && chars[j] == ','
            && chars[j + 1..j + 4].iter().all(|c| c.is_ascii_digit())
            && (j + 4 >= n || !chars[j + 4].is_ascii_digit())
        {
            s.extend(&chars[j + 1..j + 4]);
            j += 4;
            plain_int = false;
        }
    }
    if j + 1 < n && chars[j] == '.' && chars[j + 1].is_ascii_digit() {
        let k = digits(chars, j + 1);
        s.push('.');
        s.extend(&chars[j + 1..k]);
        j = k;
        plain_int = false;
    }
    let mut value: f64 = s.parse().ok()?;
    if !value.is_finite() {
        return None;
    }
    if plain_int {
        if let Some(v) = chars.get(j).copied().and_then(vulgar) {
            return Some((value + v, j + 1));
        }
        if j + 1 < n && matches!(chars[j], ' ' | '-') {
            if let Some(v) = chars[j + 1..].first().copied().and_then(vulgar) {
                return Some((value + v, j + 2));
            }
            if let Some((f, e)) = fraction(chars, j + 1) {
                if f < 1.0 {
                    value += f;
                    return Some((value, e));
                }
            }
        }
    }
    Some((value, j))
}

fn ordinal_end(chars: &[char], i: usize) -> Option<usize> {
    for suf in ["st", "nd", "rd", "th"] {
        let s: Vec<char> = suf.chars().collect();
        if i + 2 <= chars.len()
            && chars[i..i + 2]
                .iter()
                .map(|c| fold(*c))
                .eq(s.iter().copied())
            && (i + 2 >= chars.len() || !is_word(chars[i + 2]))
        {
            return Some(i + 2);
        }
    }
    None
}

/// A unit at `i` (after a number): optional `-` or one space, then a known spelling ending at
/// a word boundary. Returns the unit and the end.
fn match_unit(chars: &[char], i: usize) -> Option<(&'static UnitDef, usize)> {
    let n = chars.len();
    if i >= n {
        return None;
    }
    let (q, sep) = match chars[i] {
        '-' => (i + 1, Some('-')),
        ' ' | '\u{a0}' => (i + 1, Some(' ')),
        _ => (i, None),
    };
    for (sp, idx) in SPELLINGS.iter() {
        let def = &UNITS[*idx];
        let e = q + sp.len();
        if e > n {
            continue;
        }
        let ok = chars[q..e].iter().zip(sp.iter()).all(|(c, s)| {
            if s.is_whitespace() {
                c.is_whitespace()
            } else {
                fold(*c) == *s
            }
        });
        if !ok {
            continue;
        }
        let symbol = !sp[0].is_alphanumeric();
        // Symbols follow the number directly (`47"`, `25°C`); `%` may follow a space.
        if symbol && sep.is_some() && !(sp[0] == '%' && sep == Some(' ')) {
            continue;
        }
        match def.attach {
            Attach::Free => {}
            Attach::Only if sep == Some(' ') => continue,
            Attach::UpperSpaced
                if sep == Some(' ') && !chars[q..e].iter().all(|c| c.is_uppercase()) =>
            {
                continue
            }
            _ => {}
        }
        let last = sp[sp.len() - 1];
        let boundary = e >= n || !is_word(chars[e]);
        if (last.is_alphanumeric() || matches!(last, '"' | '\'' | '′' | '″' | '’' | '”'))
            && !boundary
        {
            continue;
        }
        // `'` after a number is feet only when no letter follows (not `90's`).
        return Some((def, e));
    }
    None
}

/// One number (with its unit, if any) at `i`.
fn parse_quantity(chars: &[char], i: usize) -> Option<(Quantity, usize, bool)> {
    let (raw, mut j) = parse_number(chars, i)?;
    let n = chars.len();
    let mut mult = 1.0;
    if j < n && matches!(chars[j], 'k' | 'K') && (j + 1 >= n || !chars[j + 1].is_alphanumeric()) {
        mult = 1000.0;
        j += 1;
    } else if let Some(e) = ordinal_end(chars, j) {
        let q = Quantity {
            value: raw,
            raw,
            dim: None,
            system: System::Neutral,
        };
        return Some((q, e, false));
    }
    if let Some((def, e)) = match_unit(chars, j) {
        let q = Quantity {
            value: raw * mult * def.factor,
            raw,
            dim: Some(def.dim),
            system: def.system,
        };
        return Some((q, e, true));
    }
    let q = Quantity {
        value: raw * mult,
        raw,
        dim: None,
        system: System::Neutral,
    };
    Some((q, j, false))
}

/// A quantity and its char span.
type Spanned = (Quantity, (usize, usize));

/// A chain of numbers: a range (`2-4 GB`, `10 to 20 cm`) or dimensions (`10 x 20 x 5 cm`,
/// `1920x1080`). The unit written last applies to the numbers before it (for `x` chains only
/// when they are lengths or three or more numbers, so `2 x 300GB` stays a count).
fn parse_chain(chars: &[char], i: usize) -> Option<(Vec<Spanned>, usize)> {
    let (q, e, _) = parse_quantity(chars, i)?;
    let mut items = vec![(q, (i, e))];
    let mut end = e;
    let mut by_x = false;
    let mut has_unit = items[0].0.dim.is_some();
    while let Some((next, x)) = chain_link(chars, end) {
        // `2-in-1` is not a range: after a unit only an `x` continues (`10 cm x 20 cm`).
        if has_unit && !x {
            break;
        }
        let Some((q2, e2, _)) = parse_quantity(chars, next) else {
            break;
        };
        by_x |= x;
        has_unit = q2.dim.is_some();
        items.push((q2, (next, e2)));
        end = e2;
    }
    if items.len() > 1 {
        if let Some(last) = items.last().map(|x| x.0) {
            if let Some(dim) = last.dim {
                let inherit = !by_x || dim == Length || items.len() >= 3;
                if inherit {
                    let factor = if last.raw != 0.0 {
                        last.value / last.raw
                    } else {
                        1.0
                    };
                    for (q, _) in items.iter_mut() {
                        if q.dim.is_none() {
                            q.value = q.raw * factor;
                            q.dim = Some(dim);
                            q.system = last.system;
                        }
                    }
                }
            }
        }
    }
    Some((items, end))
}

/// After a number at `i`: a range or dimension link followed by a digit. Returns the start
/// of the next number and whether the link was an `x`.
fn chain_link(chars: &[char], i: usize) -> Option<(usize, bool)> {
    let n = chars.len();
    let mut j = i;
    let mut spaces = 0;
    while j < n && chars[j] == ' ' && spaces < 2 {
        j += 1;
        spaces += 1;
    }
    if j >= n {
        return None;
    }
    let (k, x) = match chars[j] {
        '-' | '–' | '~' => (j + 1, false),
        'x' | 'X' | '×' | '*' => (j + 1, true),
        't' if j + 1 < n && chars[j + 1] == 'o' && spaces > 0 => (j + 2, false),
        _ => return None,
    };
    let mut k2 = k;
    let mut spaces2 = 0;
    while k2 < n && chars[k2] == ' ' && spaces2 < 2 {
        k2 += 1;
        spaces2 += 1;
    }
    // `to` needs spaces around it; `x` and `-` may be tight or spaced, not lopsided
    // (`8205x 8281` is not a dimension).
    if chars[j] == 't' && spaces2 == 0 {
        return None;
    }
    if (spaces == 0) != (spaces2 == 0) {
        return None;
    }
    (k2 < n && chars[k2].is_ascii_digit()).then_some((k2, x))
}

/// The default certification marks (configurable per channel).
pub const DEFAULT_CERTIFICATIONS: &[&str] = &[
    "Energy Star",
    "CE",
    "UL",
    "ETL",
    "FCC",
    "FDA",
    "RoHS",
    "ISO",
    "CSA",
    "TÜV",
    "TUV",
    "NSF",
    "FSC",
    "OEKO-TEX",
    "GOTS",
    "USDA Organic",
    "BIS",
    "ISI",
    "Fairtrade",
    "Greenguard",
    "Kosher",
    "Halal",
    "WEEE",
];

/// Certification marks in `chars`: all-capital marks match with their case (`CE`, not
/// `ce`), others case-insensitively; `ISO` takes its standard number (`ISO 9001:2015`).
fn certifications(chars: &[char], certs: &[String]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for cert in certs {
        let letters = cert.chars().filter(|c| c.is_alphabetic()).count();
        let exact = cert.chars().all(|c| !c.is_lowercase()) && (1..=4).contains(&letters);
        let is_iso = cert.eq_ignore_ascii_case("iso");
        for (s, mut e) in super::text::find_phrase(chars, cert) {
            if exact && slice(chars, s, e) != *cert {
                continue;
            }
            if is_iso {
                // `ISO 9001`, `ISO-14001`, `ISO9001:2015`
                let mut j = e;
                if j < chars.len() && matches!(chars[j], ' ' | '-') {
                    j += 1;
                }
                let k = digits(chars, j);
                if k > j {
                    e = k;
                    if e + 1 < chars.len() && chars[e] == ':' && chars[e + 1].is_ascii_digit() {
                        e = digits(chars, e + 1);
                    }
                }
            }
            out.push((s, e));
        }
    }
    // digits glued to ISO make it one word: handled above by find_phrase on `ISO` failing the
    // boundary; catch `ISO9001` here.
    for w in words(chars) {
        let t: String = slice(chars, w.start, w.end);
        let iso = t.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("iso"))
            && t.get(3..)
                .is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_digit()));
        if iso && certs.iter().any(|c| c.eq_ignore_ascii_case("iso")) {
            out.push((w.start, w.end));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Claims of `text`, in order. `certs` is the certification list.
pub fn extract(text: &str, certs: &[String]) -> Vec<Claim> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let cert_spans = certifications(&chars, certs);
    for &(s, e) in &cert_spans {
        let t = slice(&chars, s, e);
        out.push(Claim {
            kind: ClaimKind::Certification,
            span: (s, e),
            key: compact(&t),
            text: t,
            quantity: None,
        });
    }
    let in_cert = |s: usize, e: usize| cert_spans.iter().any(|&(a, b)| s < b && a < e);
    let mut consumed = 0;
    for w in words(&chars) {
        if w.start < consumed || in_cert(w.start, w.end) || !w.has_digit {
            continue;
        }
        if chars[w.start].is_ascii_digit() && !is_code(&chars[w.start..w.end]) {
            if let Some((items, end)) = parse_chain(&chars, w.start) {
                if end >= w.end {
                    for (q, (s, e)) in items {
                        out.push(number_claim(&chars, q, s, e));
                    }
                    consumed = end;
                    continue;
                }
            }
        }
        // `3-Panel`, `24-Count`, `2-Hoppers`: a count of something; the number is the claim.
        if chars[w.start].is_ascii_digit() {
            if let Some((q, e, false)) = parse_quantity(&chars, w.start) {
                let rest = &chars[e.min(w.end)..w.end];
                if rest.len() > 2 && rest[0] == '-' && rest[1..].iter().all(|c| c.is_alphabetic()) {
                    out.push(number_claim(&chars, q, w.start, w.end));
                    consumed = w.end;
                    continue;
                }
            }
        }
        if w.has_alpha || !chars[w.start].is_ascii_digit() || is_code(&chars[w.start..w.end]) {
            let t = slice(&chars, w.start, w.end);
            out.push(Claim {
                kind: ClaimKind::PartNumber,
                span: (w.start, w.end),
                key: compact(&t),
                text: t,
                quantity: None,
            });
        } else {
            // digits and separators that are not one number: each number.
            let mut i = w.start;
            while i < w.end {
                if chars[i].is_ascii_digit() {
                    if let Some((q, e, _)) = parse_quantity(&chars, i) {
                        let e = e.min(w.end).max(i + 1);
                        out.push(number_claim(&chars, q, i, e));
                        i = e;
                        continue;
                    }
                }
                i += 1;
            }
        }
        consumed = w.end;
    }
    out.sort_by_key(|c| c.span);
    out
}

/// Digits joined by hyphens that read as a code, not a range: `123476-001`, `010457-001`,
/// `555-123-4567` (a part with a leading zero, a part of 5+ digits, or 3+ parts).
fn is_code(word: &[char]) -> bool {
    if !word.iter().all(|c| c.is_ascii_digit() || *c == '-') || !word.contains(&'-') {
        return false;
    }
    let parts: Vec<&[char]> = word.split(|c| *c == '-').collect();
    parts.len() >= 3
        || parts
            .iter()
            .any(|p| p.len() >= 5 || (p.len() > 1 && p.first() == Some(&'0')))
}

fn number_claim(chars: &[char], q: Quantity, s: usize, e: usize) -> Claim {
    let t = slice(chars, s, e);
    let digits_only = t.chars().all(|c| c.is_ascii_digit());
    let kind = match q.dim {
        Some(Percent) => ClaimKind::Percent,
        None if digits_only && t.len() == 4 && (1900.0..=2100.0).contains(&q.raw) => {
            ClaimKind::Year
        }
        _ => ClaimKind::Number,
    };
    Claim {
        kind,
        span: (s, e),
        key: compact(&t),
        text: t,
        quantity: Some(q),
    }
}

/// Every number of `text` as written, including those inside part numbers (digit runs), for
/// grounding bare numbers of the copy.
pub fn digit_runs(text: &str) -> Vec<f64> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() {
            match parse_number(&chars, i) {
                Some((v, e)) => {
                    out.push(v);
                    // the integer part alone too (`2.00` -> 2, `47 1/4` -> 47)
                    let d = digits(&chars, i);
                    if let Ok(v) = slice(&chars, i, d).parse::<f64>() {
                        out.push(v);
                    }
                    i = e.max(i + 1);
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Whether two quantities are the same fact: same dimension and value (a 2% tolerance between
/// metric and imperial units, for rounded conversions).
pub fn same_value(a: f64, b: f64, tolerance: f64) -> bool {
    let scale = a.abs().max(b.abs()).max(1e-12);
    (a - b).abs() <= tolerance * scale
}

pub const EXACT: f64 = 1e-6;
pub const CONVERTED: f64 = 0.02;

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(t: &str) -> Vec<Claim> {
        let certs: Vec<String> = DEFAULT_CERTIFICATIONS
            .iter()
            .map(|s| s.to_string())
            .collect();
        extract(t, &certs)
    }

    fn one(t: &str) -> Quantity {
        let c = claims(t);
        assert_eq!(c.len(), 1, "{t}: {c:?}");
        c[0].quantity
            .unwrap_or_else(|| panic!("{t}: not a quantity: {c:?}"))
    }

    fn close(a: f64, b: f64) -> bool {
        same_value(a, b, EXACT)
    }

    #[test]
    fn gigahertz_forms_are_equal() {
        for t in [
            "2.0GHz",
            "2 GHz",
            "2GHz",
            "2000 MHz",
            "2.00ghz",
            "2,000 MHz",
        ] {
            let q = one(t);
            assert_eq!(q.dim, Some(Hertz), "{t}");
            assert!(close(q.value, 2e9), "{t}: {q:?}");
        }
    }

    #[test]
    fn storage_with_hyphen_and_spaces() {
        for t in ["1.5-TB", "1.5 TB", "1.5TB", "1500 GB", "1,500GB"] {
            let q = one(t);
            assert_eq!(q.dim, Some(Bytes), "{t}");
            assert!(close(q.value, 1.5e12), "{t}: {q:?}");
        }
        let (a, b) = (one("24MB"), one("24 MB"));
        assert_eq!(a.dim, b.dim);
        assert!(close(a.value, b.value) && close(a.value, 24e6));
    }

    #[test]
    fn thousands_rpm_and_cores() {
        let q = one("5.9K RPM");
        assert_eq!((q.dim, q.raw), (Some(Rpm), 5.9));
        assert!(close(q.value, 5900.0));
        assert!(close(one("5900RPM").value, 5900.0));
        let q = one("15K");
        assert_eq!(q.dim, None);
        assert!(close(q.value, 15000.0));
        for t in ["10-core", "10 cores", "10 Core"] {
            let q = one(t);
            assert_eq!(q.dim, Some(Count("core")), "{t}");
            assert!(close(q.value, 10.0));
        }
    }

    #[test]
    fn fractions_and_inches() {
        let c = claims("Table 47 1/4\" wide");
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].text, "47 1/4\"");
        assert_eq!(c[0].span, (6, 13));
        let q = c[0].quantity.unwrap();
        assert_eq!(q.dim, Some(Length));
        assert!(close(q.raw, 47.25));
        assert!(close(q.value, 47.25 * 25.4));
        for t in ["47.25 inches", "47.25in", "47¼\"", "47-1/4 inch"] {
            assert!(close(one(t).value, 47.25 * 25.4), "{t}");
        }
        let cm = one("120 cm");
        assert!(same_value(cm.value, 47.25 * 25.4, CONVERTED));
        assert!(!same_value(cm.value, 47.25 * 25.4, EXACT));
        assert!(close(one("8 oz").value, 8.0 * 28.349_523_125));
        assert!(close(one("1/2\"").value, 12.7));
    }

    #[test]
    fn percentages_and_years() {
        let c = claims("Save 20% since 2019, 100 percent cotton");
        let kinds: Vec<_> = c.iter().map(|c| (c.kind, c.text.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (ClaimKind::Percent, "20%"),
                (ClaimKind::Year, "2019"),
                (ClaimKind::Percent, "100 percent")
            ]
        );
        // a number with a unit is not a year
        assert_eq!(claims("2000 MHz")[0].kind, ClaimKind::Number);
        // a range of years is two years; a hyphenated code is one part number
        let c = claims("2016-2017 diary, part 123476-001");
        let kinds: Vec<_> = c.iter().map(|c| (c.kind, c.text.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (ClaimKind::Year, "2016"),
                (ClaimKind::Year, "2017"),
                (ClaimKind::PartNumber, "123476-001")
            ]
        );
    }

    #[test]
    fn part_numbers_with_dashes_are_one_claim() {
        let c = claims("HP 643770-B21 Xeon E7-4850 (ST31500541AS) BL680c G7");
        let parts: Vec<_> = c
            .iter()
            .map(|c| (c.kind, c.text.as_str(), c.key.as_str()))
            .collect();
        assert_eq!(
            parts,
            [
                (ClaimKind::PartNumber, "643770-B21", "643770b21"),
                (ClaimKind::PartNumber, "E7-4850", "e74850"),
                (ClaimKind::PartNumber, "ST31500541AS", "st31500541as"),
                (ClaimKind::PartNumber, "BL680c", "bl680c"),
                (ClaimKind::PartNumber, "G7", "g7"),
            ]
        );
        // 2-in-1 is one token, not a number with a unit
        let c = claims("a 2-in-1 laptop");
        assert_eq!(
            (c.len(), c[0].kind, c[0].key.as_str()),
            (1, ClaimKind::PartNumber, "2in1")
        );
    }

    #[test]
    fn slashed_spec_lists_split_into_claims() {
        let c = claims("(2.00GHz/10-core/24MB/130W)");
        let t: Vec<_> = c.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(t, ["2.00GHz", "10-core", "24MB", "130W"]);
        assert_eq!(c[3].quantity.unwrap().dim, Some(Watt));
    }

    #[test]
    fn ranges_and_dimensions_share_the_unit() {
        let c = claims("10 x 20 x 5 cm, 2-4 GB, 2 x 300GB");
        let q: Vec<_> = c
            .iter()
            .map(|c| (c.text.clone(), c.quantity.unwrap()))
            .collect();
        assert_eq!(q.len(), 7, "{q:?}");
        assert!(close(q[0].1.value, 100.0) && q[0].1.dim == Some(Length));
        assert!(close(q[3].1.value, 2e9) && q[3].1.dim == Some(Bytes));
        assert_eq!(q[5].1.dim, None, "2 x 300GB: the 2 is a count");
    }

    #[test]
    fn certifications_take_case_and_iso_numbers() {
        let c = claims("Energy Star and CE marked, ISO 9001:2015; once upon a time");
        let t: Vec<_> = c.iter().map(|c| (c.kind, c.text.as_str())).collect();
        assert_eq!(
            t,
            [
                (ClaimKind::Certification, "Energy Star"),
                (ClaimKind::Certification, "CE"),
                (ClaimKind::Certification, "ISO 9001:2015"),
            ]
        );
    }

    #[test]
    fn spans_are_char_offsets_in_multibyte_text() {
        let t = "Größe: 2,5 cm — Kühlschrank 130W ✓ 24MB";
        let c = claims(t);
        let chars: Vec<char> = t.chars().collect();
        for cl in &c {
            assert_eq!(slice(&chars, cl.span.0, cl.span.1), cl.text);
        }
        let texts: Vec<_> = c.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["2", "5 cm", "130W", "24MB"]);
        assert_eq!(c[2].span, (28, 32));
    }

    #[test]
    fn feet_needs_no_letter_after_the_apostrophe() {
        assert_eq!(one("6'").dim, Some(Length));
        let c = claims("the 90's");
        assert_eq!(c[0].quantity.unwrap().dim, None);
    }

    #[test]
    fn no_panic_on_odd_numbers() {
        for t in [
            "1/0",
            "99999999999999999999999999999999999999",
            "1.",
            ".5",
            "1,00",
            "4/",
            "½",
            "1e400",
            "٣٤",
            "1 /4",
            "x1",
            "1-",
            "--1--",
            "1''",
            "1 to",
            "3 to 4",
        ] {
            let _ = claims(t);
        }
    }
}
