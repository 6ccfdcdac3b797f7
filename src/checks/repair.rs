//! Deterministic repair that cannot add facts.
//!
//! Only two kinds of change are made: removing text the model wrote (characters, phrases,
//! markup, contacts, claims, sentences, items, the tail of an over-long text) and filling
//! fields or list items that are missing from the spec's facts through the channel's
//! `[fallback]` templates. A removal never joins two words, and a trim cuts only at
//! whitespace, so every token of the result is a token of the input copy, of the spec, or of
//! a fallback template; fallback text goes through the same checks, and any claim the spec
//! does not support is dropped from it too.
//!
//! Order per text: removals (forbidden characters and phrases, HTML, URLs, e-mails, phones,
//! placeholders) -> dropped sentences (commerce claims, injection echoes) -> dropped
//! unsupported claims -> trim to the maximum length on a word boundary -> capital first
//! letter. Per list: fix each item (drop the ones that stay wrong) -> de-duplicate -> cut to
//! the maximum count -> fill to the minimum from the fallback. Removals come before the trim
//! so that the trim keeps as much good copy as the limit allows. The caller re-runs `check`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{
    rules::{self, Ctx, Fix, Hit, Limits},
    text::{
        self, count, fold, is_segment_separator, remove_range, sentences, slice, tidy, word_count,
    },
    Counting, FieldRules, FieldValue, Fields, Finding, Severity,
};
use crate::{
    channel::{Channel, FieldDefKind},
    spec::ProductSpec,
};

/// Where a field's final text came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldSource {
    /// Written by the model (possibly trimmed or cut by a deterministic fix).
    Model,
    /// Filled (wholly or partly) by the channel's fallback template from spec facts.
    Fallback,
}

/// The result of [`repair`].
#[derive(Debug, Clone, PartialEq)]
pub struct Repaired {
    pub fields: Fields,
    pub sources: BTreeMap<String, FieldSource>,
    /// What was done, one line per fix, e.g. `bullets[2]: removed "free shipping"
    /// (phrase.forbidden)`.
    pub applied: Vec<String>,
}

/// Repairs the fields that have error findings (and fills missing ones). Fields without
/// errors are left as they are. Never adds a fact; the caller re-runs `check`.
pub fn repair(
    channel: &Channel,
    spec: &ProductSpec,
    fields: &Fields,
    findings: &[Finding],
) -> Repaired {
    let ctx = Ctx::new(&channel.rules, spec);
    let fallback = FallbackRenderer::new(channel, spec);
    let to_fix: BTreeSet<&str> = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .map(|f| f.field.as_str())
        .collect();
    let mut out = Repaired {
        fields: Fields::new(),
        sources: BTreeMap::new(),
        applied: Vec::new(),
    };
    for def in &channel.fields {
        let name = def.name.as_str();
        let value = fields.get(name);
        let well_typed = matches!(
            (def.kind, value),
            (FieldDefKind::Text, Some(FieldValue::Text(_)))
                | (FieldDefKind::List, Some(FieldValue::List(_)))
        );
        if well_typed && !to_fix.contains(name) {
            if let Some(v) = value {
                out.fields.insert(name.to_string(), v.clone());
                out.sources.insert(name.to_string(), FieldSource::Model);
            }
            continue;
        }
        let r = channel.rules.effective(name);
        let mut notes = Vec::new();
        let (v, source) = match def.kind {
            FieldDefKind::Text => {
                let text = match value {
                    Some(FieldValue::Text(t)) => Some(t.clone()),
                    Some(FieldValue::List(items)) => Some(items.join(" ")),
                    None => None,
                };
                repair_text_field(&ctx, &fallback, name, &r, text, &mut notes)
            }
            FieldDefKind::List => {
                let items = match value {
                    Some(FieldValue::List(items)) => Some(items.clone()),
                    Some(FieldValue::Text(t)) => Some(
                        t.lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty())
                            .map(str::to_string)
                            .collect(),
                    ),
                    None => None,
                };
                let (min, max) = def.item_range();
                repair_list_field(&ctx, &fallback, name, &r, items, (min, max), &mut notes)
            }
        };
        if let Some(v) = v {
            out.fields.insert(name.to_string(), v);
            out.sources.insert(name.to_string(), source);
        }
        out.applied.extend(notes);
    }
    // fields the channel does not declare pass through untouched
    for (k, v) in fields {
        if channel.field(k).is_none() {
            out.fields.insert(k.clone(), v.clone());
            out.sources.insert(k.clone(), FieldSource::Model);
        }
    }
    out
}

fn errors(ctx: &Ctx<'_>, r: &FieldRules, lim: Limits, t: &str, item: bool) -> Vec<Hit> {
    rules::scan(ctx, r, lim, t, item)
        .into_iter()
        .filter(|h| r.severity_of(h.rule) == Severity::Error)
        .collect()
}

fn repair_text_field(
    ctx: &Ctx<'_>,
    fallback: &FallbackRenderer,
    name: &str,
    r: &FieldRules,
    text: Option<String>,
    notes: &mut Vec<String>,
) -> (Option<FieldValue>, FieldSource) {
    let lim = Limits::text(r);
    let fixed = text
        .as_deref()
        .and_then(|t| fix_text(ctx, r, lim, t, false, name, notes));
    if let Some(t) = &fixed {
        if errors(ctx, r, lim, t, false).is_empty() {
            return (Some(FieldValue::Text(t.clone())), FieldSource::Model);
        }
    }
    let mut fb_notes = Vec::new();
    let fb = fallback
        .lines(name, notes)
        .map(|lines| lines.join(" "))
        .and_then(|t| fix_text(ctx, r, lim, &t, false, name, &mut fb_notes));
    match (fixed, fb) {
        (_, Some(f)) if errors(ctx, r, lim, &f, false).is_empty() => {
            notes.push(format!("{name}: replaced by the fallback"));
            (Some(FieldValue::Text(f)), FieldSource::Fallback)
        }
        (Some(t), _) => (Some(FieldValue::Text(t)), FieldSource::Model),
        (None, Some(f)) => {
            notes.push(format!("{name}: replaced by the fallback"));
            (Some(FieldValue::Text(f)), FieldSource::Fallback)
        }
        (None, None) => {
            notes.push(format!("{name}: could not be repaired; left as it was"));
            (text.map(FieldValue::Text), FieldSource::Model)
        }
    }
}

fn repair_list_field(
    ctx: &Ctx<'_>,
    fallback: &FallbackRenderer,
    name: &str,
    r: &FieldRules,
    items: Option<Vec<String>>,
    (min, max): (usize, usize),
    notes: &mut Vec<String>,
) -> (Option<FieldValue>, FieldSource) {
    let lim = Limits::item(r);
    let original = items.clone();
    let mut kept: Vec<String> = Vec::new();
    for (i, it) in items.unwrap_or_default().iter().enumerate() {
        let label = format!("{name}[{i}]");
        match fix_text(ctx, r, lim, it, true, &label, notes) {
            Some(t) => {
                let remaining = errors(ctx, r, lim, &t, true);
                if remaining.is_empty() {
                    kept.push(t);
                } else {
                    notes.push(format!(
                        "{label}: dropped ({})",
                        remaining
                            .iter()
                            .map(|h| h.rule)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            None => notes.push(format!("{label}: dropped")),
        }
    }
    if r.unique_items == Some(true) {
        let dups: BTreeSet<usize> = rules::duplicates(&kept)
            .into_iter()
            .map(|(_, j)| j)
            .collect();
        if !dups.is_empty() {
            notes.push(format!("{name}: dropped {} repeated item(s)", dups.len()));
            kept = kept
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !dups.contains(i))
                .map(|(_, t)| t)
                .collect();
        }
    }
    if kept.len() > max {
        notes.push(format!("{name}: kept the first {max} items"));
        kept.truncate(max);
    }
    let mut source = FieldSource::Model;
    if kept.len() < min {
        // an empty list gets as many fallback items as allowed; else up to the minimum
        let target = if kept.is_empty() { max } else { min };
        let mut filled = Vec::new();
        if let Some(lines) = fallback.lines(name, notes) {
            for line in lines {
                if kept.len() >= target {
                    break;
                }
                let mut scratch = Vec::new();
                let Some(t) = fix_text(ctx, r, lim, &line, true, name, &mut scratch) else {
                    continue;
                };
                if !errors(ctx, r, lim, &t, true).is_empty() {
                    continue;
                }
                let mut with = kept.clone();
                with.push(t.clone());
                if r.unique_items == Some(true) && !rules::duplicates(&with).is_empty() {
                    continue;
                }
                if kept.iter().any(|k| text::dup_key(k) == text::dup_key(&t)) {
                    continue;
                }
                kept.push(t);
                filled.push(kept.len());
            }
        }
        if !filled.is_empty() {
            source = FieldSource::Fallback;
            notes.push(format!(
                "{name}: filled item(s) {} from the fallback",
                filled
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if kept.is_empty() {
        if let Some(o) = original {
            notes.push(format!("{name}: could not be repaired; left as it was"));
            return (Some(FieldValue::List(o)), FieldSource::Model);
        }
    }
    (Some(FieldValue::List(kept)), source)
}

/// Applies the fixes of the error hits of one text until none applies. `None` when nothing
/// usable is left (the text or item is dropped).
fn fix_text(
    ctx: &Ctx<'_>,
    r: &FieldRules,
    lim: Limits,
    t: &str,
    item: bool,
    label: &str,
    notes: &mut Vec<String>,
) -> Option<String> {
    let mut cur = t.to_string();
    for _ in 0..200 {
        let mut hits: Vec<Hit> = errors(ctx, r, lim, &cur, item)
            .into_iter()
            .filter(|h| h.fix != Fix::None)
            .collect();
        if hits.is_empty() {
            break;
        }
        hits.sort_by_key(|h| (h.fix, h.span));
        // all removals at once (a forbidden character everywhere it occurs)
        let chars: Vec<char> = cur.chars().collect();
        let mut ranges = Vec::new();
        for h in hits.iter().filter(|h| h.fix == Fix::Remove) {
            let (s, e) = h.span.unwrap_or((0, chars.len()));
            if h.rule == "chars.forbidden" && e == s + 1 && !text::is_word(chars[s]) {
                let c = chars[s];
                ranges.extend(
                    (0..chars.len())
                        .filter(|&i| chars[i] == c)
                        .map(|i| (i, i + 1)),
                );
            } else {
                ranges.push(whole_words(&chars, s, e));
            }
            notes.push(format!(
                "{label}: removed \"{}\" ({})",
                slice(&chars, s, e),
                h.rule
            ));
        }
        if !ranges.is_empty() {
            let n = text::remove_ranges(&cur, &ranges);
            if n.trim().is_empty() {
                return None;
            }
            if n != cur {
                cur = n;
                continue;
            }
        }
        let mut progressed = false;
        for h in hits.iter().filter(|h| h.fix != Fix::Remove) {
            let chars: Vec<char> = cur.chars().collect();
            let (s, e) = h.span.unwrap_or((0, chars.len()));
            // a removal never leaves part of a word behind (that would be a new token)
            let (s, e) = match h.fix {
                Fix::DropClaim => whole_words(&chars, s, e),
                _ => (s, e),
            };
            let what = slice(&chars, s, e);
            let next: Option<String> = match h.fix {
                Fix::Remove | Fix::None => continue,
                Fix::DropSentence => {
                    let n = drop_sentence(&cur, (s, e));
                    notes.push(format!(
                        "{label}: dropped the sentence with \"{what}\" ({})",
                        h.rule
                    ));
                    n
                }
                Fix::DropClaim => {
                    let n = drop_claim(&cur, (s, e), item);
                    notes.push(format!("{label}: dropped \"{what}\" ({})", h.rule));
                    n
                }
                Fix::Trim(max) => {
                    let n = trim_to(&cur, lim.counting, max, lim.min.unwrap_or(0));
                    notes.push(format!("{label}: trimmed to {max} characters ({})", h.rule));
                    Some(n)
                }
                Fix::Capitalize => {
                    let n = capitalize(&cur);
                    notes.push(format!(
                        "{label}: capitalised the first letter ({})",
                        h.rule
                    ));
                    Some(n)
                }
                Fix::DropItem => {
                    notes.push(format!("{label}: dropped ({})", h.rule));
                    None
                }
            };
            match next {
                None => return None,
                Some(n) if n.trim().is_empty() => return None,
                Some(n) if n != cur => {
                    cur = n;
                    progressed = true;
                    break;
                }
                Some(_) => {
                    // no change: forget the note and try the next hit
                    notes.pop();
                }
            }
        }
        if !progressed {
            break;
        }
    }
    Some(cur)
}

/// Widens `[s, e)` so that it does not start or end inside a run of letters and digits.
fn whole_words(chars: &[char], mut s: usize, mut e: usize) -> (usize, usize) {
    let n = chars.len();
    s = s.min(n);
    e = e.clamp(s, n);
    while s > 0 && s < n && text::is_word(chars[s]) && text::is_word(chars[s - 1]) {
        s -= 1;
    }
    while e > 0 && e < n && text::is_word(chars[e - 1]) && text::is_word(chars[e]) {
        e += 1;
    }
    (s, e)
}

/// Drops the sentence holding the span; in a text of one sentence (a title, a bullet), the
/// list segment holding it when there is one (`Acme drive, free shipping on all orders`);
/// `None` when nothing would be left.
fn drop_sentence(t: &str, (s, e): (usize, usize)) -> Option<String> {
    let chars: Vec<char> = t.chars().collect();
    let n = chars.len();
    let (s, e) = (s.min(n), e.clamp(s.min(n), n));
    let sents = sentences(&chars);
    if sents.len() <= 1 {
        let seg = segment(&chars, s, e, 0, n);
        if seg.left.is_none() && seg.right.is_none() {
            return None;
        }
        return non_empty(remove_range(t, seg.removal.0, seg.removal.1));
    }
    let (a, b) = sents
        .iter()
        .copied()
        .find(|&(a, b)| s >= a && s < b)
        .unwrap_or_else(|| {
            // the span in whitespace between sentences: the one after
            sents
                .iter()
                .copied()
                .find(|&(a, _)| a >= s)
                .unwrap_or(sents[sents.len() - 1])
        });
    non_empty(remove_range(t, a, b))
}

/// The list segment around `[s, e)` inside the sentence `[ss, se)`.
struct Segment {
    /// The segment's text range.
    start: usize,
    end: usize,
    /// The separators before and after it, if any.
    left: Option<usize>,
    right: Option<usize>,
    /// What to remove to drop the segment with one separator.
    removal: (usize, usize),
}

fn segment(chars: &[char], s: usize, e: usize, ss: usize, se: usize) -> Segment {
    let mut left = None;
    let mut a = s;
    while a > ss {
        if is_segment_separator(chars, a - 1) {
            left = Some(a - 1);
            break;
        }
        a -= 1;
    }
    let mut right = None;
    let mut b = e;
    while b < se {
        if is_segment_separator(chars, b) {
            right = Some(b);
            break;
        }
        b += 1;
    }
    let removal = match (left, right) {
        // the whole parenthetical was this one segment
        (Some(l), Some(r)) if chars[l] == '(' && chars[r] == ')' => (l, r + 1),
        (Some(l), _) if chars[l] != '(' => (l, b),
        (_, Some(r)) if chars[r] != ')' => (a, r + 1),
        (Some(l), _) => (l + 1, b),
        (None, _) => (a, b),
    };
    Segment {
        start: a,
        end: b,
        left,
        right,
        removal,
    }
}

/// Words after which a removed claim leaves a sentence that does not read.
const DANGLING: &[&str] = &[
    "at",
    "of",
    "to",
    "by",
    "than",
    "is",
    "are",
    "was",
    "were",
    "be",
    "up",
    "over",
    "under",
    "about",
    "approximately",
    "approx",
    "nearly",
    "around",
    "only",
    "just",
    "from",
    "between",
    "a",
    "an",
    "the",
    "weighs",
    "measures",
    "offers",
    "reaches",
    "holds",
    "and",
    "or",
    "per",
];

/// Drops an unsupported claim: its list segment when the segment is little more than the
/// claim (`(2.0GHz/10-core/24MB)`, `, 64MB cache,`), else its sentence when there are
/// several, else the claim token itself when the sentence still reads; `None` when the whole
/// text (item) has to go.
fn drop_claim(t: &str, (s, e): (usize, usize), item: bool) -> Option<String> {
    let chars: Vec<char> = t.chars().collect();
    let n = chars.len();
    let (s, e) = (s.min(n), e.min(n));
    let sents = sentences(&chars);
    let (ss, se) = sents
        .iter()
        .copied()
        .find(|&(a, b)| s >= a && s < b)
        .unwrap_or((0, n));
    // the list segment around the claim, inside its sentence
    let seg = segment(&chars, s, e, ss, se);
    let seg_words = word_count(&chars[seg.start..seg.end]);
    let claim_words = word_count(&chars[s..e]);
    // the claim and a word or two (`64MB cache`) between separators, or one word at the
    // start or end of the sentence
    let spare = if seg.left.is_some() && seg.right.is_some() {
        2
    } else {
        1
    };
    if (seg.left.is_some() || seg.right.is_some()) && seg_words <= claim_words + spare {
        return non_empty(remove_range(t, seg.removal.0, seg.removal.1));
    }
    if sents.len() > 1 {
        return non_empty(remove_range(t, ss, se));
    }
    // one sentence: remove the token if what is left still reads
    let before: String = {
        let mut k = s;
        while k > 0 && !text::is_word(chars[k - 1]) {
            k -= 1;
        }
        let end = k;
        while k > 0 && text::is_word(chars[k - 1]) {
            k -= 1;
        }
        chars[k..end].iter().map(|c| fold(*c)).collect()
    };
    if DANGLING.contains(&before.as_str()) && (item || word_count(&chars) > 4) {
        return None;
    }
    // what hangs on the claim goes with it: `48/Pk`, `$24.64`, `5 x` (not other numbers)
    let (mut s, mut e) = (s, e);
    let mut k = e;
    while k < n
        && !chars[k].is_whitespace()
        && !matches!(chars[k], ',' | '.' | ';' | ':' | '!' | '?' | ')')
    {
        k += 1;
    }
    if !chars[e..k].iter().any(|c| c.is_numeric()) {
        e = k;
    }
    while s > 0 && matches!(chars[s - 1], '$' | '€' | '£' | '₹' | '¥' | '#' | '~' | '+') {
        s -= 1;
    }
    if e + 2 < n
        && chars[e] == ' '
        && matches!(chars[e + 1], 'x' | 'X' | '×')
        && chars[e + 2] == ' '
    {
        e += 2;
    }
    let out = remove_range(t, s, e);
    if word_count(&out.chars().collect::<Vec<_>>()) < 2 {
        return None;
    }
    Some(out)
}

fn non_empty(s: String) -> Option<String> {
    (!s.trim().is_empty()).then_some(s)
}

/// Words a trimmed text must not end with.
const STOP: &[&str] = &[
    "and",
    "or",
    "with",
    "for",
    "of",
    "the",
    "a",
    "an",
    "to",
    "in",
    "on",
    "at",
    "by",
    "from",
    "plus",
    "including",
    "featuring",
    "but",
    "nor",
    "as",
    "that",
    "which",
    "while",
    "its",
    "their",
    "your",
    "our",
    "into",
    "via",
    "per",
    "than",
    "up",
    "is",
    "are",
    "has",
    "have",
];

/// Trims `t` to at most `max` (counted) characters: at a sentence end when that keeps at least
/// half the limit (and `min`), else at the last whitespace that fits, without a trailing
/// separator, conjunction, preposition or unclosed bracket. Never cuts inside a word; a text
/// without a fitting word boundary becomes empty.
pub fn trim_to(t: &str, counting: Counting, max: usize, min: usize) -> String {
    if count(t, counting) <= max {
        return t.to_string();
    }
    let chars: Vec<char> = t.chars().collect();
    let w = text::weights(t, counting);
    let prefix = |i: usize| -> usize { w[..i.min(w.len())].iter().sum() };
    let floor = min.max(max / 2);
    let best_sentence = sentences(&chars)
        .into_iter()
        .map(|(_, e)| e)
        .filter(|&e| prefix(e) <= max && prefix(e) >= floor)
        .max();
    if let Some(e) = best_sentence {
        return tidy(&slice(&chars, 0, e));
    }
    let cut = (1..chars.len())
        .rev()
        .find(|&i| chars[i].is_whitespace() && prefix(i) <= max);
    let Some(cut) = cut else {
        return String::new();
    };
    let mut s = slice(&chars, 0, cut);
    loop {
        let before = s.clone();
        s = s
            .trim_end_matches(|c: char| {
                c.is_whitespace()
                    || matches!(
                        c,
                        ',' | ';' | ':' | '-' | '–' | '—' | '/' | '&' | '|' | '(' | '·'
                    )
            })
            .to_string();
        // a trailing stop word
        if let Some(i) = s.rfind(char::is_whitespace) {
            let last: String = s[i..].trim().chars().map(fold).collect();
            if STOP.contains(&last.as_str()) {
                s.truncate(i);
            }
        }
        // an unclosed bracket
        let open = s.chars().filter(|&c| c == '(').count();
        let close = s.chars().filter(|&c| c == ')').count();
        if open > close {
            if let Some(i) = s.rfind('(') {
                s.truncate(i);
            }
        }
        if s == before {
            break;
        }
    }
    tidy(&s)
}

/// Upper-cases the first letter when that is one char to one char.
fn capitalize(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    let mut done = false;
    for c in t.chars() {
        if !done && !c.is_whitespace() {
            done = true;
            let mut up = c.to_uppercase();
            if let (Some(u), None) = (up.next(), up.next()) {
                if fold(u) == c {
                    out.push(u);
                    continue;
                }
            }
        }
        out.push(c);
    }
    out
}

/// Renders the channel's `[fallback]` templates over the spec.
struct FallbackRenderer {
    tera: tera::Tera,
    ctx: tera::Context,
    errors: Vec<String>,
}

#[derive(Serialize)]
struct AttrView {
    name: String,
    value: String,
}

#[derive(Serialize)]
struct SpecView {
    id: String,
    brand: Option<String>,
    category: Option<String>,
    title: Option<String>,
    description: Option<String>,
    attributes: Vec<AttrView>,
}

const PRODUCT_ATTRS: &[&str] = &[
    "Product Type",
    "Type",
    "Product",
    "Item Type",
    "Product Name",
];
const BRAND_ATTRS: &[&str] = &["Brand", "Manufacturer", "Make", "Brand Name"];

impl FallbackRenderer {
    fn new(channel: &Channel, spec: &ProductSpec) -> Self {
        let mut ctx = tera::Context::new();
        let attrs: Vec<AttrView> = spec
            .attributes
            .iter()
            .map(|(n, v)| AttrView {
                name: n.clone(),
                value: v.display(),
            })
            .collect();
        let lookup = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| spec.attribute(n))
                .map(|v| v.display())
                .filter(|v| !v.trim().is_empty())
        };
        let brand = spec
            .brand
            .clone()
            .or_else(|| lookup(BRAND_ATTRS))
            .unwrap_or_default();
        let product = lookup(PRODUCT_ATTRS)
            .or_else(|| {
                spec.category
                    .as_deref()
                    .and_then(|c| c.rsplit(['>', '/']).next())
                    .map(|c| c.trim().to_string())
            })
            .unwrap_or_default();
        // Facts for fallback copy: not the brand or product type again, nothing that reads
        // like an instruction (spec text is data; an injected "ignore previous instructions"
        // must not become copy), nothing too long to be one fact.
        let injection = super::injection::Injection::new(spec, &[]);
        let details: Vec<&AttrView> = attrs
            .iter()
            .filter(|a| {
                !PRODUCT_ATTRS
                    .iter()
                    .chain(BRAND_ATTRS)
                    .any(|n| n.eq_ignore_ascii_case(&a.name))
                    && !a.value.eq_ignore_ascii_case(&brand)
                    && a.value.chars().count() <= 80
                    && injection.scan(&a.value).is_empty()
                    && injection.scan(&a.name).is_empty()
            })
            .collect();
        let attr: BTreeMap<&str, &str> = attrs
            .iter()
            .map(|a| (a.name.as_str(), a.value.as_str()))
            .collect();
        ctx.insert(
            "spec",
            &SpecView {
                id: spec.id.clone(),
                brand: spec.brand.clone(),
                category: spec.category.clone(),
                title: spec.title.clone(),
                description: spec.description.clone(),
                attributes: attrs
                    .iter()
                    .map(|a| AttrView {
                        name: a.name.clone(),
                        value: a.value.clone(),
                    })
                    .collect(),
            },
        );
        ctx.insert("attr", &attr);
        ctx.insert("brand", &brand);
        ctx.insert("product", &product);
        ctx.insert("details", &details);
        let mut tera = tera::Tera::new();
        tera.autoescape_on(Vec::<&str>::new());
        tera.register_filter("hashtag", |s: &str, _: tera::Kwargs, _: &tera::State| {
            hashtag(s)
        });
        let mut errors = Vec::new();
        for (field, src) in &channel.fallback {
            if let Err(e) = tera.add_raw_template(field, src) {
                errors.push(format!("[fallback] {field}: {}", error_chain(&e)));
            }
        }
        FallbackRenderer { tera, ctx, errors }
    }

    /// The field's fallback as non-empty lines (one per list item), whitespace collapsed.
    fn lines(&self, field: &str, notes: &mut Vec<String>) -> Option<Vec<String>> {
        if !self.tera.contains_template(field) {
            let prefix = format!("[fallback] {field}:");
            notes.extend(
                self.errors
                    .iter()
                    .filter(|e| e.starts_with(&prefix))
                    .cloned(),
            );
            return None;
        }
        match self.tera.render(field, &self.ctx) {
            Ok(s) => {
                let lines: Vec<String> = s
                    .lines()
                    .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                    .filter(|l| !l.is_empty())
                    .collect();
                (!lines.is_empty()).then_some(lines)
            }
            Err(e) => {
                notes.push(format!(
                    "{field}: fallback template failed: {}",
                    error_chain(&e)
                ));
                None
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Checks that the channel's `[fallback]` templates parse and render (over a small sample
/// spec, and over `spec`'s facts when given). For channel loading: a broken template should
/// fail at start-up, not at the first repair.
pub fn check_fallback_templates(
    channel: &Channel,
    spec: Option<&ProductSpec>,
) -> Result<(), String> {
    let sample;
    let spec = match spec {
        Some(s) => s,
        None => {
            sample = crate::spec::validate(
                serde_json::json!({"id": "sample", "brand": "Brand", "category": "Category",
                    "attributes": {"Product Type": "Thing", "Color": "Red"}}),
                crate::spec::Position::Single,
                &crate::config::InputLimits::default(),
            )
            .map_err(|e| e.to_string())?;
            &sample
        }
    };
    let r = FallbackRenderer::new(channel, spec);
    if let Some(e) = r.errors.first() {
        return Err(e.clone());
    }
    for field in channel.fallback.keys() {
        r.tera
            .render(field, &r.ctx)
            .map_err(|e| format!("[fallback] {field}: {}", error_chain(&e)))?;
    }
    Ok(())
}

/// `#` and the words of `s` joined (`Hard Drive` -> `#HardDrive`); empty when `s` has no
/// letters, or when joining would glue two numbers together (which would make a new number).
fn hashtag(s: &str) -> String {
    let words: Vec<&str> = s
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    if !s.chars().any(char::is_alphabetic) {
        return String::new();
    }
    let mut out = String::from("#");
    let mut prev_digit = false;
    for w in words {
        let starts_digit = w.chars().next().is_some_and(|c| c.is_numeric());
        if prev_digit && starts_digit {
            return String::new();
        }
        out.push_str(w);
        prev_digit = w.chars().last().is_some_and(|c| c.is_numeric());
    }
    out
}

#[cfg(test)]
mod tests;
