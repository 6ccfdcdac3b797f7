//! Text helpers shared by the rules and the repair step: character counting (plain and X's
//! weighted count), char-offset spans, case-insensitive phrase search with word boundaries,
//! sentence and segment splitting, and removals that never glue two words together.
//!
//! Every offset in this module is a char (Unicode scalar value) index, never a byte index.

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// How a field's length is counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Counting {
    /// Unicode scalar values.
    #[default]
    Chars,
    /// X (Twitter) weighted counting: CJK, other wide scripts and emoji count 2 (an emoji
    /// sequence with modifiers or joiners counts 2 in all), Latin and similar scripts count 1,
    /// a URL counts 23.
    X,
}

/// URL length under X counting.
const X_URL_WEIGHT: usize = 23;

/// Whether `c` is a pictographic emoji (or a regional indicator, half of a flag).
pub fn is_emoji(c: char) -> bool {
    let u = c as u32;
    matches!(u,
        0x1F000..=0x1FAFF
        | 0x2600..=0x27BF
        | 0x2300..=0x23FF
        | 0x2B05..=0x2B07
        | 0x2B1B..=0x2B1C
        | 0x2B50
        | 0x2B55
        | 0x2934..=0x2935
        | 0x25AA..=0x25AB
        | 0x25B6
        | 0x25C0
        | 0x25FB..=0x25FE
        | 0x3030
        | 0x303D
        | 0x3297
        | 0x3299
        | 0x203C
        | 0x2049
        | 0x2122
        | 0x2139
        | 0x2194..=0x2199
        | 0x21A9..=0x21AA
        | 0x24C2
        | 0xA9
        | 0xAE
    )
}

/// Characters that only modify or join the emoji before them (count 0 under X counting).
fn is_emoji_modifier(c: char) -> bool {
    let u = c as u32;
    matches!(u, 0x200D | 0xFE00..=0xFE0F | 0x1F3FB..=0x1F3FF | 0x20E3 | 0xE0020..=0xE007F)
}

fn x_light(c: char) -> bool {
    let u = c as u32;
    matches!(u, 0..=0x10FF | 0x2000..=0x200D | 0x2010..=0x201F | 0x2032..=0x2037)
}

/// Weight of each char under `counting`, by char index.
pub fn weights(text: &str, counting: Counting) -> Vec<usize> {
    let chars: Vec<char> = text.chars().collect();
    match counting {
        Counting::Chars => vec![1; chars.len()],
        Counting::X => {
            let mut w = vec![0usize; chars.len()];
            let mut in_emoji = false;
            let mut after_zwj = false;
            let mut ri_open = false;
            for (i, &c) in chars.iter().enumerate() {
                let u = c as u32;
                if in_emoji && is_emoji_modifier(c) {
                    after_zwj = c == '\u{200D}';
                    w[i] = 0;
                    continue;
                }
                if (0x1F1E6..=0x1F1FF).contains(&u) {
                    // Regional indicators pair up into one flag.
                    w[i] = if ri_open { 0 } else { 2 };
                    ri_open = !ri_open;
                    in_emoji = true;
                    after_zwj = false;
                    continue;
                }
                ri_open = false;
                if is_emoji(c) && u > 0x10FF {
                    w[i] = if after_zwj { 0 } else { 2 };
                    in_emoji = true;
                    after_zwj = false;
                    continue;
                }
                if u <= 0x10FF && is_emoji(c) {
                    // ©, ®: one, or an emoji when a variation selector follows.
                    let vs = chars.get(i + 1) == Some(&'\u{FE0F}');
                    w[i] = if vs { 2 } else { 1 };
                    in_emoji = vs;
                    after_zwj = false;
                    continue;
                }
                in_emoji = false;
                after_zwj = false;
                w[i] = if x_light(c) { 1 } else { 2 };
            }
            // A URL counts 23 whatever its length.
            for (s, e) in url_spans(text) {
                if s < w.len() {
                    w[s] = X_URL_WEIGHT;
                    for x in w.iter_mut().take(e.min(chars.len())).skip(s + 1) {
                        *x = 0;
                    }
                }
            }
            w
        }
    }
}

/// Length of `text` under `counting`.
pub fn count(text: &str, counting: Counting) -> usize {
    match counting {
        Counting::Chars => text.chars().count(),
        Counting::X => weights(text, counting).iter().sum(),
    }
}

/// The first char index at which the counted length goes over `max` (None when it fits).
pub fn overflow_at(text: &str, counting: Counting, max: usize) -> Option<usize> {
    let mut total = 0;
    for (i, w) in weights(text, counting).into_iter().enumerate() {
        total += w;
        if total > max {
            return Some(i);
        }
    }
    None
}

static URL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b(?:https?://|ftp://|www\.)[^\s<>()]+|\b[a-z0-9][a-z0-9-]*(?:\.[a-z0-9-]+)*\.(?:com|net|org|io|co|in|de|uk|us|eu|fr|es|it|nl|info|biz|shop|store|online|site|app|ly)\b(?:/[^\s<>()]*)?",
    )
    .expect("url regex")
});

/// Char spans of URLs (with or without a scheme).
pub fn url_spans(text: &str) -> Vec<(usize, usize)> {
    regex_spans(&URL, text)
        .into_iter()
        .map(|(s, e)| {
            // A sentence-final dot or comma is not part of the URL.
            let chars: Vec<char> = text.chars().collect();
            let mut e = e;
            while e > s + 1 && matches!(chars.get(e - 1), Some('.' | ',' | ';' | ':' | '!' | '?')) {
                e -= 1;
            }
            (s, e)
        })
        .collect()
}

/// Char spans of every match of `re` in `text`.
pub fn regex_spans(re: &Regex, text: &str) -> Vec<(usize, usize)> {
    let map = ByteToChar::new(text);
    re.find_iter(text)
        .map(|m| (map.get(m.start()), map.get(m.end())))
        .collect()
}

/// Converts byte offsets (at char boundaries) into char offsets.
pub struct ByteToChar {
    starts: Vec<usize>,
}

impl ByteToChar {
    pub fn new(text: &str) -> Self {
        Self {
            starts: text.char_indices().map(|(b, _)| b).collect(),
        }
    }

    pub fn get(&self, byte: usize) -> usize {
        match self.starts.binary_search(&byte) {
            Ok(i) | Err(i) => i,
        }
    }
}

/// The text of char range `[start, end)`.
pub fn slice(chars: &[char], start: usize, end: usize) -> String {
    let end = end.min(chars.len());
    let start = start.min(end);
    chars[start..end].iter().collect()
}

pub fn is_word(c: char) -> bool {
    c.is_alphanumeric()
}

/// Simple case folding, one char to one char (so char offsets stay valid).
pub fn fold(c: char) -> char {
    let mut l = c.to_lowercase();
    match (l.next(), l.next()) {
        (Some(x), None) => x,
        _ => c,
    }
}

/// Case-insensitive occurrences of `phrase` in `text` at word boundaries: a phrase that
/// starts (ends) with a letter or digit must not be preceded (followed) by one. A space in the
/// phrase matches any run of whitespace or hyphens. Returns char spans.
pub fn find_phrase(chars: &[char], phrase: &str) -> Vec<(usize, usize)> {
    let p: Vec<char> = phrase.trim().chars().map(fold).collect();
    let mut out = Vec::new();
    if p.is_empty() {
        return out;
    }
    let mut i = 0;
    while i < chars.len() {
        if let Some(end) = match_at(chars, i, &p) {
            let before_ok = !is_word(p[0]) || i == 0 || !is_word(chars[i - 1]);
            let last = p[p.len() - 1];
            let after_ok = !is_word(last) || end >= chars.len() || !is_word(chars[end]);
            if before_ok && after_ok {
                out.push((i, end));
                i = end.max(i + 1);
                continue;
            }
        }
        i += 1;
    }
    out
}

fn match_at(chars: &[char], start: usize, p: &[char]) -> Option<usize> {
    let mut i = start;
    let mut j = 0;
    while j < p.len() {
        if p[j].is_whitespace() {
            let mut n = 0;
            while i < chars.len() && (chars[i].is_whitespace() || chars[i] == '-') {
                i += 1;
                n += 1;
            }
            if n == 0 {
                return None;
            }
            while j < p.len() && p[j].is_whitespace() {
                j += 1;
            }
            continue;
        }
        if i >= chars.len() || fold(chars[i]) != p[j] {
            return None;
        }
        i += 1;
        j += 1;
    }
    Some(i)
}

/// Removes char range `[start, end)`; when that would join two words, a space stays between
/// them. The result is tidied.
pub fn remove_range(text: &str, start: usize, end: usize) -> String {
    remove_ranges(text, &[(start, end)])
}

/// Removes several char ranges at once (they may overlap), then tidies.
pub fn remove_ranges(text: &str, ranges: &[(usize, usize)]) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut drop = vec![false; chars.len()];
    for &(s, e) in ranges {
        for d in drop.iter_mut().take(e.min(chars.len())).skip(s) {
            *d = true;
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if drop[i] {
            // A removed run becomes one space (tidy collapses or drops it).
            while i < chars.len() && drop[i] {
                i += 1;
            }
            out.push(' ');
            continue;
        }
        out.push(chars[i]);
        i += 1;
    }
    tidy(&out)
}

const CLOSERS: &[char] = &[',', '.', ';', ':', '!', '?', ')', ']', '%'];
const SEPARATORS: &[char] = &[',', ';', ':', '/', '|', '-', '–', '—', '&', '+', '·', '•'];

/// Collapses whitespace, removes spaces before closing punctuation and after opening
/// brackets, empty brackets, doubled separators, and leading or trailing separators. Never
/// joins two words: only whitespace next to punctuation is removed.
pub fn tidy(text: &str) -> String {
    let mut s: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    loop {
        let before = s.clone();
        for (from, to) in [
            ("( )", " "),
            ("()", " "),
            ("[ ]", " "),
            ("[]", " "),
            ("( ", "("),
            (" )", ")"),
            ("[ ", "["),
            (" ]", "]"),
            (", ,", ","),
            (",,", ","),
            (";;", ";"),
            (" ,", ","),
            (" .", "."),
            (" ;", ";"),
            (" :", ":"),
            (" !", "!"),
            (" ?", "?"),
            (",.", "."),
            (";.", "."),
            (":.", "."),
            (", .", "."),
            ("..", "."),
            ("//", "/"),
            ("/ /", "/"),
            ("- -", "-"),
            ("| |", "|"),
            ("( /", "("),
            ("(/", "("),
            ("/)", ")"),
            ("/ )", ")"),
            ("(,", "("),
            (",)", ")"),
        ] {
            s = s.replace(from, to);
        }
        s = s.split_whitespace().collect::<Vec<_>>().join(" ");
        // Leading separators or closers.
        let trimmed = s
            .trim_start_matches(|c: char| {
                c.is_whitespace() || (SEPARATORS.contains(&c) && c != '+') || CLOSERS.contains(&c)
            })
            .to_string();
        s = trimmed;
        // Trailing separators (closers like `.` or `)` stay).
        let trimmed = s
            .trim_end_matches(|c: char| {
                c.is_whitespace() || (SEPARATORS.contains(&c) && c != '+') || c == '('
            })
            .to_string();
        s = trimmed;
        if s == before {
            break;
        }
    }
    s
}

/// Sentence spans (char offsets): a sentence ends at `.`, `!` or `?` (or `…`) followed by
/// whitespace and a capital letter, a digit, a quote or the end, unless the word before is a
/// common abbreviation; a line break also ends a sentence.
pub fn sentences(chars: &[char]) -> Vec<(usize, usize)> {
    const ABBREV: &[&str] = &[
        "e.g", "i.e", "approx", "no", "vs", "etc", "inc", "ltd", "dr", "mr", "mrs", "ms", "st",
        "in", "ft", "oz", "lb", "lbs", "fl", "max", "min", "co", "corp", "jr", "sr", "dept", "est",
        "fig", "ref", "pt", "qty", "sq",
    ];
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let mut end_here = None;
        if c == '\n' {
            end_here = Some(i);
        } else if matches!(c, '.' | '!' | '?' | '…') {
            let mut j = i + 1;
            while j < chars.len() && matches!(chars[j], '.' | '!' | '?' | '…' | '"' | '\'' | ')')
            {
                j += 1;
            }
            // The next sentence starts after whitespace with anything but a lowercase letter.
            let next_ok = j >= chars.len()
                || (chars[j].is_whitespace() && {
                    let mut k = j;
                    while k < chars.len() && chars[k].is_whitespace() {
                        k += 1;
                    }
                    k >= chars.len() || !chars[k].is_lowercase()
                });
            let abbrev = c == '.' && {
                let mut k = i;
                while k > 0 && (chars[k - 1].is_alphabetic() || chars[k - 1] == '.') {
                    k -= 1;
                }
                let w: String = chars[k..i].iter().map(|c| fold(*c)).collect();
                ABBREV.contains(&w.as_str())
            };
            if next_ok && !abbrev {
                end_here = Some(j);
            }
        }
        if let Some(e) = end_here {
            if chars[start..e].iter().any(|c| !c.is_whitespace()) {
                out.push(trim_span(chars, start, e));
            }
            start = e;
            i = e.max(i + 1);
            continue;
        }
        i += 1;
    }
    if chars[start.min(chars.len())..]
        .iter()
        .any(|c| !c.is_whitespace())
    {
        out.push(trim_span(chars, start, chars.len()));
    }
    out
}

/// Narrows `[start, end)` so that it starts and ends with non-whitespace.
pub fn trim_span(chars: &[char], mut start: usize, mut end: usize) -> (usize, usize) {
    while start < end && chars[start].is_whitespace() {
        start += 1;
    }
    while end > start && chars[end - 1].is_whitespace() {
        end -= 1;
    }
    (start, end)
}

/// Separators between list-like segments inside a sentence.
pub fn is_segment_separator(chars: &[char], i: usize) -> bool {
    match chars[i] {
        ',' | ';' | '|' | '(' | ')' | '[' | ']' | '–' | '—' | '•' | '·' => true,
        // `/` between words (not inside a fraction like 1/4).
        '/' => {
            !(i > 0
                && i + 1 < chars.len()
                && chars[i - 1].is_ascii_digit()
                && chars[i + 1].is_ascii_digit())
        }
        // ` - ` (a spaced dash), not a hyphen inside a word.
        '-' => {
            (i == 0 || chars[i - 1].is_whitespace())
                && (i + 1 >= chars.len() || chars[i + 1].is_whitespace())
        }
        _ => false,
    }
}

/// Number of words (runs of letters or digits) in `chars`.
pub fn word_count(chars: &[char]) -> usize {
    let mut n = 0;
    let mut in_word = false;
    for &c in chars {
        if is_word(c) {
            if !in_word {
                n += 1;
            }
            in_word = true;
        } else {
            in_word = false;
        }
    }
    n
}

/// Normal form for duplicate detection: lowercase words joined by single spaces.
pub fn dup_key(text: &str) -> String {
    let mut out = String::new();
    for w in text.split(|c: char| !is_word(c)).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(w.chars().map(fold));
    }
    out
}

/// Letters and digits only, lowercased: `643770-B21` -> `643770b21`.
pub fn compact(text: &str) -> String {
    text.chars().filter(|c| is_word(*c)).map(fold).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x_counting_counts_cjk_and_emoji_as_two() {
        assert_eq!(count("hello", Counting::X), 5);
        assert_eq!(count("日本語", Counting::X), 6);
        assert_eq!(count("日本語", Counting::Chars), 3);
        assert_eq!(count("ok 👍", Counting::X), 5);
        // skin tone modifier and ZWJ family: one emoji each
        assert_eq!(count("👍🏽", Counting::X), 2);
        assert_eq!(count("👨\u{200D}👩\u{200D}👧", Counting::X), 2);
        // a flag is two regional indicators, one emoji
        assert_eq!(count("🇩🇪", Counting::X), 2);
        assert_eq!(count("café", Counting::X), 4);
        assert_eq!(
            count(
                "see https://example.com/a/very/long/path/indeed",
                Counting::X
            ),
            4 + 23
        );
    }

    #[test]
    fn overflow_index_uses_weights() {
        assert_eq!(overflow_at("abc", Counting::Chars, 3), None);
        assert_eq!(overflow_at("abcd", Counting::Chars, 3), Some(3));
        // "日本" weighs 4: the second char goes over 3
        assert_eq!(overflow_at("日本", Counting::X, 3), Some(1));
    }

    #[test]
    fn phrases_match_case_insensitively_at_word_boundaries() {
        let chars: Vec<char> = "Free  Shipping! Wholesale. #1 choice, #10 not."
            .chars()
            .collect();
        assert_eq!(find_phrase(&chars, "free shipping"), vec![(0, 14)]);
        assert!(find_phrase(&chars, "sale").is_empty());
        assert_eq!(find_phrase(&chars, "#1"), vec![(27, 29)]);
        let chars: Vec<char> = "Größe – free-shipping".chars().collect();
        assert_eq!(find_phrase(&chars, "FREE SHIPPING"), vec![(8, 21)]);
    }

    #[test]
    fn removal_never_joins_words_and_tidies() {
        assert_eq!(remove_range("a<b>b", 1, 4), "a b");
        assert_eq!(
            remove_range("Fast, free shipping, great", 6, 19),
            "Fast, great"
        );
        assert_eq!(remove_range("Drive (64MB) here", 7, 11), "Drive here");
        assert_eq!(tidy("  , x ,, y .  "), "x, y.");
    }

    #[test]
    fn sentences_split_on_terminators_not_decimals() {
        let text = "Runs at 2.0 GHz. Has 10 cores! Approx. 5 in. wide. ok";
        let chars: Vec<char> = text.chars().collect();
        let s: Vec<String> = sentences(&chars)
            .into_iter()
            .map(|(a, b)| slice(&chars, a, b))
            .collect();
        assert_eq!(
            s,
            [
                "Runs at 2.0 GHz.",
                "Has 10 cores!",
                "Approx. 5 in. wide. ok"
            ]
        );
    }

    #[test]
    fn byte_offsets_map_to_char_offsets() {
        let t = "é€a";
        let m = ByteToChar::new(t);
        assert_eq!(m.get(0), 0);
        assert_eq!(m.get(2), 1);
        assert_eq!(m.get(5), 2);
        assert_eq!(m.get(6), 3);
    }
}
