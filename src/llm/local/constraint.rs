//! Schema-constrained and number-grounded decoding: [`JsonConstraint`].
//!
//! The output can only be one compact JSON object with the schema's fields in order,
//! `{"title":"...","bullets":["...","..."]}`: braces, keys, colons, commas and quotes are
//! forced, and a token that spans structure and content (`":"`, `","`, `"]}`) is accepted
//! when its bytes match character by character. Every token's bytes run through a
//! byte-level automaton ([`State`]); a token is allowed when they all pass and a valid end
//! can still be reached within the token budget.
//!
//! String content:
//! - valid UTF-8 (a token may hold part of a character; the rest must follow), no control
//!   characters, no `"` inside and no `\` at all (so no escapes), no non-ASCII digits, no
//!   braces or angle brackets (markup junk, never product copy);
//! - not starting with whitespace, never empty;
//! - at most `max_chars` characters (Unicode scalar values) per text field or list item,
//!   [`DEFAULT_MAX_CHARS`] when the schema sets none; at the limit only the closing quote.
//!
//! Grounded numbers (when `allowed_numbers` is given): a number is what the grounding
//! regex of `checks::spec_numbers` finds, `\d+(?:[.,]\d+)*`, anywhere in the content (also
//! inside a part number: `ST2000DM008` holds `2000` and `008`, and so does the spec's own
//! copy of it). Each such run in the output must be one of the allowed numbers: a digit is
//! allowed only while the run stays a prefix of one, and the run may end (any other
//! character, or a `.`/`,` not followed by a digit) only where it equals one. So `2.0GHz`
//! can be copied when `2.0` is allowed, `2.` ends a sentence only when `2` is allowed too,
//! and `3` cannot be written when only `30` is. With an empty list, no digits at all.
//!
//! Budget: the constraint knows `max_new_tokens`. Before each token it computes the length
//! of the shortest valid ending from the state each candidate leads to (closing quote,
//! missing items as `"x"`, remaining keys with one-character values, `}`), counted in
//! characters, which bounds the tokens it needs (every byte is a token of a byte-level
//! vocabulary). A candidate is allowed only if that ending still fits in the tokens left, so
//! the text is a complete object of the schema when the cap is reached. (When the cap is
//! smaller than the shortest object, every token must shorten the ending; the output is
//! then cut off.)
//!
//! Cost: the vocabulary is read once per tokenizer into a [`TokenTable`]. In the common
//! state (inside a string, no number pending) the "plain" tokens (valid UTF-8, no quote,
//! backslash, control character or digit) are decided by one pass over a per-token length
//! array; only the few thousand other tokens are simulated. Forced states (structure) only
//! simulate the tokens starting with the expected byte. See `bench::mask_cost`.

use std::sync::{Arc, LazyLock};

use regex::Regex;

use super::{sampler::LogitsConstraint, tokenizer::GgufTokenizer};
use crate::llm::{FieldKind, OutputSchema};

/// Characters a text field or list item may hold when the schema sets no limit.
pub const DEFAULT_MAX_CHARS: usize = 300;

const NONE: u32 = u32::MAX;
/// `Str::pending` after a number that ended at a `.`/`,` that cannot continue it: a digit
/// right after would join it into a longer (not allowed) number.
const DEAD: u32 = u32::MAX - 1;
/// Length marker of a token that is not plain (never below any limit).
const NOT_PLAIN: u16 = u16::MAX;

/// What the constraint needs to know about each token of a vocabulary. Built once per
/// tokenizer ([`GgufTokenizer::token_table`]).
#[derive(Debug)]
pub struct TokenTable {
    /// Token `i`'s bytes are `bytes[offsets[i]..offsets[i + 1]]`; control tokens have none.
    offsets: Vec<u32>,
    bytes: Vec<u8>,
    /// Character count of a plain token, else [`NOT_PLAIN`].
    plain_len: Vec<u16>,
    /// Like `plain_len`, but [`NOT_PLAIN`] also for tokens starting with whitespace.
    plain_len_nows: Vec<u16>,
    /// Like `plain_len`, but [`NOT_PLAIN`] also for tokens with a character a hashtag may
    /// not hold after its `#`.
    plain_len_hashtag: Vec<u16>,
    /// Tokens with bytes that are not plain: simulated one by one inside strings.
    special: Vec<u32>,
    /// Tokens with bytes, by their first byte.
    by_first: Vec<Vec<u32>>,
    end_of_turn: Vec<u32>,
}

/// Whether `c` is a digit for the grounding regex (`\d` is Unicode-aware).
/// Braces and angle brackets never belong in product copy; a small model that is forced
/// into JSON tends to fill strings with `{{`, `}}` and `<...>` junk instead of words.
fn is_markup(c: char) -> bool {
    matches!(c, '{' | '}' | '<' | '>')
}

/// Whether a character in `lo..=hi` may follow the `#` of a hashtag: a letter or a number,
/// as the `hashtag.format` check counts them (`^#[\p{L}\p{N}]+$`), by the code point ranges
/// of the regex engine's own Unicode tables; less the decimal digits, which are written
/// (ASCII only, grounded) as numbers are everywhere else.
fn hashtag_char_in(lo: u32, hi: u32) -> bool {
    static RANGES: LazyLock<Vec<(u32, u32)>> = LazyLock::new(|| {
        use regex_syntax::hir::{Class, HirKind};
        let hir = regex_syntax::Parser::new()
            .parse(r"[[\p{L}\p{N}]--\d]")
            .expect("hashtag class");
        match hir.kind() {
            HirKind::Class(Class::Unicode(c)) => c
                .ranges()
                .iter()
                .map(|r| (u32::from(r.start()), u32::from(r.end())))
                .collect(),
            other => unreachable!("a class parses as a class, not {other:?}"),
        }
    });
    let i = RANGES.partition_point(|&(_, end)| end < lo);
    RANGES.get(i).is_some_and(|&(start, _)| start <= hi)
}

fn is_hashtag_char(c: char) -> bool {
    hashtag_char_in(u32::from(c), u32::from(c))
}

/// Whether the character begun in `s` (`need` continuation bytes due; none: it is
/// complete) is, or can still end as, a character a hashtag may hold.
fn hashtag_char_possible(s: &Str) -> bool {
    let n = u32::from(s.need);
    if n == 0 {
        return hashtag_char_in(s.cp, s.cp);
    }
    let low_bits = 6 * (n - 1);
    let base = s.cp << (6 * n);
    let lo = base | (u32::from(s.lo & 0x3F) << low_bits);
    let hi = base | (u32::from(s.hi & 0x3F) << low_bits) | ((1 << low_bits) - 1);
    hashtag_char_in(lo, hi)
}

fn is_unicode_digit(c: char) -> bool {
    static D: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\d$").expect("digit regex"));
    c.is_ascii_digit() || (c.is_numeric() && D.is_match(c.encode_utf8(&mut [0; 4])))
}

impl TokenTable {
    pub fn new(tok: &GgufTokenizer) -> Self {
        let n = tok.vocab_size();
        let mut t = TokenTable {
            offsets: Vec::with_capacity(n + 1),
            bytes: Vec::with_capacity(n * 8),
            plain_len: Vec::with_capacity(n),
            plain_len_nows: Vec::with_capacity(n),
            plain_len_hashtag: Vec::with_capacity(n),
            special: Vec::new(),
            by_first: vec![Vec::new(); 256],
            end_of_turn: tok.end_of_turn_ids().to_vec(),
        };
        t.offsets.push(0);
        for id in 0..n as u32 {
            let b = tok.token_bytes(id).unwrap_or_default();
            let plain = std::str::from_utf8(&b).ok().filter(|s| {
                !s.is_empty()
                    && s.chars().all(|c| {
                        !is_markup(c)
                            && c != '"'
                            && c != '\\'
                            && !c.is_control()
                            && !is_unicode_digit(c)
                    })
            });
            match plain {
                Some(s) => {
                    let len = u16::try_from(s.chars().count())
                        .unwrap_or(NOT_PLAIN - 1)
                        .min(NOT_PLAIN - 1);
                    t.plain_len.push(len);
                    let ws = s.starts_with(char::is_whitespace);
                    t.plain_len_nows.push(if ws { NOT_PLAIN } else { len });
                    let word = s.chars().all(is_hashtag_char);
                    t.plain_len_hashtag.push(if word { len } else { NOT_PLAIN });
                }
                None => {
                    t.plain_len.push(NOT_PLAIN);
                    t.plain_len_nows.push(NOT_PLAIN);
                    t.plain_len_hashtag.push(NOT_PLAIN);
                    if !b.is_empty() {
                        t.special.push(id);
                    }
                }
            }
            if let Some(&first) = b.first() {
                t.by_first[usize::from(first)].push(id);
            }
            t.bytes.extend_from_slice(&b);
            t.offsets.push(t.bytes.len() as u32);
        }
        t
    }

    fn bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&a), Some(&b)) => &self.bytes[a as usize..b as usize],
            _ => &[],
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.plain_len.len()
    }

    /// How many tokens are simulated one by one inside a string.
    pub fn special_count(&self) -> usize {
        self.special.len()
    }
}

/// A trie of the allowed numbers over `0-9 . ,`.
#[derive(Debug, Clone)]
struct Numbers {
    children: Vec<[u32; 12]>,
    terminal: Vec<bool>,
    /// Fewest characters that make the node's prefix an allowed number.
    min_rest: Vec<u32>,
    /// The same with digits only (inside a hashtag, where `.` and `,` cannot be written).
    digits_rest: Vec<u32>,
}

fn num_index(b: u8) -> Option<usize> {
    match b {
        b'0'..=b'9' => Some(usize::from(b - b'0')),
        b'.' => Some(10),
        b',' => Some(11),
        _ => None,
    }
}

impl Numbers {
    /// Numbers that are not of the regex's form (`\d+(?:[.,]\d+)*`, ASCII) are ignored.
    fn new(allowed: &[String]) -> Self {
        static FORM: LazyLock<Regex> =
            LazyLock::new(|| Regex::new(r"^[0-9]+(?:[.,][0-9]+)*$").expect("number form"));
        let mut t = Numbers {
            children: vec![[NONE; 12]],
            terminal: vec![false],
            min_rest: vec![u32::MAX],
            digits_rest: vec![u32::MAX],
        };
        for n in allowed.iter().filter(|n| FORM.is_match(n)) {
            let mut node = 0usize;
            for b in n.bytes() {
                let i = num_index(b).expect("checked by FORM");
                if t.children[node][i] == NONE {
                    t.children[node][i] = t.children.len() as u32;
                    t.children.push([NONE; 12]);
                    t.terminal.push(false);
                    t.min_rest.push(u32::MAX);
                    t.digits_rest.push(u32::MAX);
                }
                node = t.children[node][i] as usize;
            }
            t.terminal[node] = true;
        }
        // Children come after their parents: one backward pass.
        for node in (0..t.children.len()).rev() {
            let mut best = if t.terminal[node] { 0 } else { u32::MAX };
            let mut digits = best;
            for (i, &c) in t.children[node].iter().enumerate() {
                if c != NONE {
                    best = best.min(t.min_rest[c as usize].saturating_add(1));
                    if i < 10 {
                        digits = digits.min(t.digits_rest[c as usize].saturating_add(1));
                    }
                }
            }
            t.min_rest[node] = best;
            t.digits_rest[node] = digits;
        }
        t
    }

    /// Numbers are unconstrained: every run is a prefix of something allowed.
    fn any() -> Self {
        let mut t = Numbers {
            children: vec![[0; 12]],
            terminal: vec![true],
            min_rest: vec![0],
            digits_rest: vec![0],
        };
        // one node that loops to itself: every run is allowed and complete
        t.children[0] = [0; 12];
        t
    }

    fn child(&self, node: u32, b: u8) -> u32 {
        match num_index(b) {
            Some(i) => self.children[node as usize][i],
            None => NONE,
        }
    }

    fn terminal(&self, node: u32) -> bool {
        self.terminal[node as usize]
    }

    fn min_rest(&self, node: u32) -> u32 {
        self.min_rest[node as usize]
    }

    fn digits_rest(&self, node: u32) -> u32 {
        self.digits_rest[node as usize]
    }
}

/// What comes after a literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Content { field: u16, item: u16 },
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pos {
    /// Inside forced text `lits[lit]`, `off` bytes of it written.
    Lit { lit: u16, off: u16, next: Next },
    /// Inside a string value (a text field, or item `item` of a list field).
    Content { field: u16, item: u16 },
    /// After a list item's closing quote: `,` or `]`.
    ListSep { field: u16, item: u16 },
    /// After the final `}`.
    Done,
}

/// The state inside a string value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Str {
    /// Characters so far (a partly written character counts).
    chars: u32,
    /// No complete character yet.
    empty: bool,
    /// Continuation bytes still due for the current character, and the range of the next.
    need: u8,
    lo: u8,
    hi: u8,
    cp: u32,
    /// The number being written (a trie node; `NONE` when not in a number).
    run: u32,
    /// The node after a `.`/`,` that directly follows `run` (it continues the number if a
    /// digit comes next), or [`DEAD`].
    pending: u32,
}

impl Str {
    const FRESH: Str = Str {
        chars: 0,
        empty: true,
        need: 0,
        lo: 0,
        hi: 0,
        cp: 0,
        run: NONE,
        pending: NONE,
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    pos: Pos,
    s: Str,
}

#[derive(Debug, Clone, Copy)]
struct Field {
    list: bool,
    min_items: u32,
    max_items: u32,
    max_chars: u32,
    /// Characters a string needs before it may close (while the budget allows).
    min_chars: u32,
    /// Each string is a hashtag: `#`, then letters and digits only.
    hashtag: bool,
    /// Index in `lits` of what follows the value (`,"next":"`, `,"next":["` or `}`).
    tail: u16,
    /// Shortest text from after the value to the end (the tail, the next fields' minimal
    /// values, `}`).
    tail_cost: u32,
}

/// Index of the literal `"` that opens a list item after the first.
const QUOTE_LIT: u16 = 1;

/// Only one compact JSON object of a schema, with grounded numbers, within a token budget.
pub struct JsonConstraint {
    table: Arc<TokenTable>,
    numbers: Numbers,
    fields: Vec<Field>,
    lits: Vec<Vec<u8>>,
    state: State,
    max_new: usize,
    steps: usize,
    /// While masking: a string may not close before its `min_chars` (off when nothing
    /// else would be allowed, so the budget always wins).
    strict_min: std::cell::Cell<bool>,
}

impl std::fmt::Debug for JsonConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonConstraint")
            .field("state", &self.state)
            .field("max_new", &self.max_new)
            .field("steps", &self.steps)
            .finish()
    }
}

impl JsonConstraint {
    /// `allowed_numbers`: `None` leaves numbers free; `Some(&[])` allows no digits.
    /// `max_new` is the most tokens the generation may take.
    pub fn new(
        schema: &OutputSchema,
        allowed_numbers: Option<&[String]>,
        tokenizer: &GgufTokenizer,
        max_new: usize,
    ) -> Self {
        Self::with_table(schema, allowed_numbers, tokenizer.token_table(), max_new)
    }

    pub fn with_table(
        schema: &OutputSchema,
        allowed_numbers: Option<&[String]>,
        table: Arc<TokenTable>,
        max_new: usize,
    ) -> Self {
        let key = |name: &str| serde_json::to_string(name).unwrap_or_else(|_| "\"\"".into());
        let opener = |f: &crate::llm::SchemaField| match f.kind {
            FieldKind::Text { .. } => "\"",
            FieldKind::List { .. } => "[\"",
        };
        let cap = |m: Option<usize>| {
            u32::try_from(m.unwrap_or(DEFAULT_MAX_CHARS).max(1)).unwrap_or(u32::MAX)
        };
        let mut lits: Vec<Vec<u8>> = vec![Vec::new(), b"\"".to_vec()];
        lits[0] = match schema.fields.first() {
            Some(f) => format!("{{{}:{}", key(&f.name), opener(f)).into_bytes(),
            None => b"{}".to_vec(),
        };
        let mut fields = Vec::with_capacity(schema.fields.len());
        for (i, f) in schema.fields.iter().enumerate() {
            let tail = match schema.fields.get(i + 1) {
                Some(n) => format!(",{}:{}", key(&n.name), opener(n)),
                None => "}".into(),
            };
            lits.push(tail.into_bytes());
            let (list, min_items, max_items, max_chars) = match f.kind {
                FieldKind::Text { max_chars } => (false, 1, 1, cap(max_chars)),
                FieldKind::List {
                    min_items,
                    max_items,
                    item_max_chars,
                } => {
                    let max = max_items.max(1) as u32;
                    (true, (min_items as u32).min(max), max, cap(item_max_chars))
                }
            };
            fields.push(Field {
                hashtag: f.hashtags,
                list,
                min_items,
                max_items,
                max_chars,
                min_chars: f
                    .min_chars
                    .map_or(0, |m| u32::try_from(m).unwrap_or(u32::MAX))
                    .min(max_chars),
                tail: (lits.len() - 1) as u16,
                tail_cost: 0,
            });
        }
        // Costs, from the last field back.
        let mut c = Self {
            table,
            numbers: match allowed_numbers {
                Some(a) => Numbers::new(a),
                None => Numbers::any(),
            },
            fields,
            lits,
            strict_min: std::cell::Cell::new(false),
            state: State {
                pos: Pos::Lit {
                    lit: 0,
                    off: 0,
                    next: Next::Done,
                },
                s: Str::FRESH,
            },
            max_new,
            steps: 0,
        };
        for i in (0..c.fields.len()).rev() {
            let tail_len = c.lits[c.fields[i].tail as usize].len() as u32;
            let rest = if i + 1 < c.fields.len() {
                c.start_cost(i + 1, 0)
            } else {
                0
            };
            c.fields[i].tail_cost = tail_len + rest;
        }
        if !c.fields.is_empty() {
            c.state.pos = Pos::Lit {
                lit: 0,
                off: 0,
                next: Next::Content { field: 0, item: 0 },
            };
        }
        c
    }

    /// Shortest text after the closing quote of item `item` (0 for text fields) of `field`.
    fn after_close(&self, field: usize, item: u32) -> u32 {
        let f = &self.fields[field];
        if f.list {
            let missing = f.min_items.saturating_sub(item + 1);
            (4 + u32::from(f.hashtag)) * missing + 1 + f.tail_cost
        } else {
            f.tail_cost
        }
    }

    /// Shortest text from the start of a value's content to the end: one character (`#`
    /// and one for a hashtag), `"`, and what follows.
    fn start_cost(&self, field: usize, item: u32) -> u32 {
        2 + u32::from(self.fields[field].hashtag) + self.after_close(field, item)
    }

    /// Characters a string's content still needs before it may close.
    fn content_need(&self, field: usize, s: &Str) -> u32 {
        if s.need > 0 {
            return u32::from(s.need);
        }
        if self.fields[field].hashtag {
            if s.chars < 2 {
                // `#` and a letter; no number can be pending that early
                return 2 - s.chars;
            }
            return if s.run == NONE {
                0
            } else {
                self.numbers.digits_rest(s.run)
            };
        }
        let run = if s.run == NONE || self.numbers.terminal(s.run) {
            0
        } else if s.pending != NONE {
            self.numbers.min_rest(s.pending)
        } else {
            self.numbers.min_rest(s.run)
        };
        run.saturating_add(u32::from(s.empty))
    }

    /// Length of the shortest valid ending from `st` (a bound on the tokens it takes).
    fn cost(&self, st: &State) -> u32 {
        match st.pos {
            Pos::Done => 0,
            Pos::Lit { lit, off, next } => {
                let rest = self.lits[lit as usize].len() as u32 - u32::from(off);
                rest + match next {
                    Next::Done => 0,
                    Next::Content { field, item } => {
                        self.start_cost(field as usize, u32::from(item))
                    }
                }
            }
            Pos::Content { field, item } => self
                .content_need(field as usize, &st.s)
                .saturating_add(1 + self.after_close(field as usize, u32::from(item))),
            Pos::ListSep { field, item } => self.after_close(field as usize, u32::from(item)),
        }
    }

    /// Whether the content of a string in `st` can still be finished within its limit.
    fn feasible(&self, st: &State) -> bool {
        match st.pos {
            Pos::Content { field, .. } => {
                let s = &st.s;
                let extra = if s.need > 0 {
                    0 // the partial character is counted already
                } else {
                    self.content_need(field as usize, s)
                };
                s.chars.saturating_add(extra) <= self.fields[field as usize].max_chars
            }
            _ => true,
        }
    }

    /// The state after byte `b`, or `None` when `b` may not come next.
    fn step(&self, mut st: State, b: u8) -> Option<State> {
        match st.pos {
            Pos::Done => None,
            Pos::Lit { lit, off, next } => {
                let l = &self.lits[lit as usize];
                if l.get(off as usize) != Some(&b) {
                    return None;
                }
                let off = off + 1;
                st.pos = if usize::from(off) == l.len() {
                    match next {
                        Next::Done => Pos::Done,
                        Next::Content { field, item } => {
                            st.s = Str::FRESH;
                            Pos::Content { field, item }
                        }
                    }
                } else {
                    Pos::Lit { lit, off, next }
                };
                Some(st)
            }
            Pos::ListSep { field, item } => {
                let f = &self.fields[field as usize];
                match b {
                    b',' if u32::from(item) + 1 < f.max_items => {
                        st.pos = Pos::Lit {
                            lit: QUOTE_LIT,
                            off: 0,
                            next: Next::Content {
                                field,
                                item: item + 1,
                            },
                        };
                        Some(st)
                    }
                    b']' if u32::from(item) + 1 >= f.min_items => {
                        st.pos = self.after_value(field);
                        Some(st)
                    }
                    _ => None,
                }
            }
            Pos::Content { field, item } => {
                let max = self.fields[field as usize].max_chars;
                let hashtag = self.fields[field as usize].hashtag;
                let s = &mut st.s;
                if s.need > 0 {
                    if b < s.lo || b > s.hi {
                        return None;
                    }
                    s.cp = (s.cp << 6) | u32::from(b & 0x3F);
                    s.need -= 1;
                    s.lo = 0x80;
                    s.hi = 0xBF;
                    if hashtag && !hashtag_char_possible(s) {
                        return None;
                    }
                    if s.need == 0 {
                        let c = char::from_u32(s.cp)?;
                        if c.is_control() || is_unicode_digit(c) || (s.empty && c.is_whitespace()) {
                            return None;
                        }
                        s.empty = false;
                    }
                    return Some(st);
                }
                if b == b'"' {
                    if s.empty
                        || (hashtag && s.chars < 2)
                        || !self.run_may_end(s)
                        || (self.strict_min.get()
                            && s.chars < self.fields[field as usize].min_chars)
                    {
                        return None;
                    }
                    st.pos = if self.fields[field as usize].list {
                        Pos::ListSep { field, item }
                    } else {
                        self.after_value(field)
                    };
                    return Some(st);
                }
                if b == b'\\' || b < 0x20 || b == 0x7F || is_markup(char::from(b)) {
                    return None;
                }
                if s.chars >= max {
                    return None;
                }
                // a hashtag: `#`, then letters and digits (a lead byte is checked below)
                if hashtag
                    && if s.empty {
                        b != b'#'
                    } else {
                        b < 0x80 && !b.is_ascii_alphanumeric()
                    }
                {
                    return None;
                }
                if b.is_ascii_digit() {
                    if s.pending == DEAD {
                        return None;
                    }
                    let from = if s.pending != NONE {
                        s.pending
                    } else if s.run != NONE {
                        s.run
                    } else {
                        0
                    };
                    let node = self.numbers.child(from, b);
                    if node == NONE || (hashtag && self.numbers.digits_rest(node) == u32::MAX) {
                        return None;
                    }
                    s.run = node;
                    s.pending = NONE;
                } else if (b == b'.' || b == b',') && s.run != NONE && s.pending == NONE {
                    let node = self.numbers.child(s.run, b);
                    if node != NONE {
                        s.pending = node;
                    } else if self.numbers.terminal(s.run) {
                        s.run = NONE;
                        s.pending = DEAD;
                    } else {
                        return None;
                    }
                } else {
                    if !self.run_may_end(s) {
                        return None;
                    }
                    s.run = NONE;
                    s.pending = NONE;
                }
                s.chars += 1;
                if b < 0x80 {
                    if s.empty && b.is_ascii_whitespace() {
                        return None;
                    }
                    s.empty = false;
                } else {
                    // a lead byte: what the next byte may be
                    let (need, lo, hi, bits) = match b {
                        0xC2..=0xDF => (1, 0x80, 0xBF, b & 0x1F),
                        0xE0 => (2, 0xA0, 0xBF, b & 0x0F),
                        0xE1..=0xEC | 0xEE..=0xEF => (2, 0x80, 0xBF, b & 0x0F),
                        0xED => (2, 0x80, 0x9F, b & 0x0F),
                        0xF0 => (3, 0x90, 0xBF, b & 0x07),
                        0xF1..=0xF3 => (3, 0x80, 0xBF, b & 0x07),
                        0xF4 => (3, 0x80, 0x8F, b & 0x07),
                        _ => return None,
                    };
                    s.need = need;
                    s.lo = lo;
                    s.hi = hi;
                    s.cp = u32::from(bits);
                    if hashtag && !hashtag_char_possible(s) {
                        return None;
                    }
                }
                Some(st)
            }
        }
    }

    /// Whether the number being written (if any) may end here.
    fn run_may_end(&self, s: &Str) -> bool {
        s.run == NONE || self.numbers.terminal(s.run)
    }

    /// Where a field's value is followed: its tail literal, then the next field or the end.
    fn after_value(&self, field: u16) -> Pos {
        let next = if usize::from(field) + 1 < self.fields.len() {
            Next::Content {
                field: field + 1,
                item: 0,
            }
        } else {
            Next::Done
        };
        Pos::Lit {
            lit: self.fields[field as usize].tail,
            off: 0,
            next,
        }
    }

    fn run_bytes(&self, mut st: State, bytes: &[u8]) -> Option<State> {
        if bytes.is_empty() {
            return None;
        }
        for &b in bytes {
            st = self.step(st, b)?;
        }
        Some(st)
    }

    /// Whether `id` may come next, given that the ending after it must fit in `bound`.
    fn allows(&self, id: u32, bound: i64) -> bool {
        match self.run_bytes(self.state, self.table.bytes(id)) {
            Some(st) => i64::from(self.cost(&st)) <= bound && self.feasible(&st),
            None => false,
        }
    }

    /// Most characters the ending may take after the next token: the tokens left after it,
    /// or (when that cannot be met any more) anything shorter than now.
    fn bound(&self) -> i64 {
        let left = self.max_new as i64 - self.steps as i64 - 1;
        left.max(i64::from(self.cost(&self.state)) - 1)
    }

    /// Whether the object is complete.
    pub fn is_done(&self) -> bool {
        self.state.pos == Pos::Done
    }
}

impl LogitsConstraint for JsonConstraint {
    fn mask(&mut self, allowed: &mut [bool]) {
        // First with the strings' minimum lengths; without them when that leaves nothing
        // (the token budget needs the string closed now).
        self.strict_min.set(true);
        self.mask_with_limits(allowed);
        if !allowed.iter().any(|&a| a) {
            self.strict_min.set(false);
            self.mask_with_limits(allowed);
        }
        self.strict_min.set(false);
    }

    fn advance(&mut self, token: u32) -> Result<(), String> {
        self.advance_token(token)
    }
}

impl JsonConstraint {
    fn mask_with_limits(&self, allowed: &mut [bool]) {
        let t = self.table.clone();
        let bound = self.bound();
        let st = self.state;
        let set = |allowed: &mut [bool], ids: &[u32], f: &dyn Fn(u32) -> bool| {
            for &id in ids {
                if let Some(a) = allowed.get_mut(id as usize) {
                    *a = f(id);
                }
            }
        };
        match st.pos {
            Pos::Content { field, .. }
                if st.s.need == 0
                    && self.run_may_end(&st.s)
                    && !(self.fields[field as usize].hashtag && st.s.empty) =>
            {
                // Plain tokens: decided by their length alone.
                let now = i64::from(self.cost(&st));
                // what a plain token's first character still owes (the first character of
                // a string, the letter after a hashtag's `#`) is paid by it
                let after = now - i64::from(self.content_need(field as usize, &st.s).min(1));
                let limit = if after <= bound {
                    let max = self.fields[field as usize].max_chars;
                    u16::try_from(max.saturating_sub(st.s.chars)).unwrap_or(NOT_PLAIN - 1)
                } else {
                    0
                };
                let lens = if self.fields[field as usize].hashtag {
                    &t.plain_len_hashtag
                } else if st.s.empty {
                    &t.plain_len_nows
                } else {
                    &t.plain_len
                };
                let n = allowed.len().min(lens.len());
                for (a, &l) in allowed[..n].iter_mut().zip(&lens[..n]) {
                    *a = l <= limit;
                }
                allowed[n..].fill(false);
                set(allowed, &t.special, &|id| self.allows(id, bound));
            }
            Pos::Done => {
                allowed.fill(false);
                set(allowed, &t.end_of_turn, &|_| true);
            }
            _ => {
                allowed.fill(false);
                let firsts: Vec<u8> = match st.pos {
                    Pos::Lit { lit, off, .. } => vec![self.lits[lit as usize][off as usize]],
                    Pos::ListSep { .. } => vec![b',', b']'],
                    Pos::Content { .. } if st.s.need > 0 => (st.s.lo..=st.s.hi).collect(),
                    // a hashtag's `#`
                    Pos::Content { .. } if st.s.empty => vec![b'#'],
                    // a number that must go on
                    _ => b"0123456789.,".to_vec(),
                };
                for b in firsts {
                    set(allowed, &t.by_first[usize::from(b)], &|id| {
                        self.allows(id, bound)
                    });
                }
            }
        }
    }

    fn advance_token(&mut self, token: u32) -> Result<(), String> {
        self.steps += 1;
        if self.table.end_of_turn.contains(&token) {
            return if self.state.pos == Pos::Done {
                Ok(())
            } else {
                Err(format!(
                    "end of turn before the object is complete ({:?})",
                    self.state.pos
                ))
            };
        }
        let bytes = self.table.bytes(token);
        match self.run_bytes(self.state, bytes) {
            Some(st) => {
                self.state = st;
                Ok(())
            }
            None => Err(format!(
                "token {token} ({:?}) may not come next ({:?})",
                String::from_utf8_lossy(bytes),
                self.state.pos
            )),
        }
    }
}

#[cfg(test)]
mod tests;
