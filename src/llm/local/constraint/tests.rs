//! Tests of [`JsonConstraint`] with the real SmolLM2 vocabulary (read from the GGUF file's
//! metadata; the weights are not loaded).

use std::sync::OnceLock;

use candle_core::quantized::gguf_file;
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::*;
use crate::llm::{FieldKind, OutputSchema, SchemaField};

fn tokenizer() -> &'static GgufTokenizer {
    static T: OnceLock<GgufTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let mut f = std::fs::File::open(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; fetch the model with `cargo run -- models fetch`",
                path.display()
            )
        });
        let ct = gguf_file::Content::read(&mut f).unwrap();
        GgufTokenizer::from_gguf(&ct).unwrap()
    })
}

fn text(name: &str, max_chars: Option<usize>) -> SchemaField {
    SchemaField {
        name: name.into(),
        kind: FieldKind::Text { max_chars },
        min_chars: None,
        hashtags: false,
    }
}

fn list(name: &str, min_items: usize, max_items: usize, item_max: Option<usize>) -> SchemaField {
    SchemaField {
        name: name.into(),
        kind: FieldKind::List {
            min_items,
            max_items,
            item_max_chars: item_max,
        },
        min_chars: None,
        hashtags: false,
    }
}

fn seo() -> OutputSchema {
    OutputSchema {
        name: "seo".into(),
        fields: vec![text("title", Some(60)), text("meta_description", Some(160))],
    }
}

fn amazon() -> OutputSchema {
    OutputSchema {
        name: "amazon".into(),
        fields: vec![text("title", Some(200)), list("bullets", 5, 5, Some(255))],
    }
}

fn social() -> OutputSchema {
    OutputSchema {
        name: "social".into(),
        fields: vec![
            text("post", Some(280)),
            SchemaField {
                min_chars: Some(2),
                hashtags: true,
                ..list("hashtags", 1, 5, Some(40))
            },
        ],
    }
}

fn nums(n: &[&str]) -> Vec<String> {
    n.iter().map(|s| s.to_string()).collect()
}

fn constraint(schema: &OutputSchema, allowed: Option<&[&str]>, max_new: usize) -> JsonConstraint {
    let a = allowed.map(nums);
    JsonConstraint::new(schema, a.as_deref(), tokenizer(), max_new)
}

fn mask(c: &mut JsonConstraint) -> Vec<bool> {
    let mut allowed = vec![true; tokenizer().vocab_size()];
    c.mask(&mut allowed);
    allowed
}

fn show(id: u32) -> String {
    String::from_utf8_lossy(&tokenizer().token_bytes(id).unwrap_or_default()).into_owned()
}

/// Feeds `ids`, checking each against the mask first. Err names the first refused token.
fn feed(c: &mut JsonConstraint, ids: &[u32]) -> Result<(), String> {
    for (i, &id) in ids.iter().enumerate() {
        if !mask(c)[id as usize] {
            let before: String = ids[..i].iter().map(|&t| show(t)).collect();
            return Err(format!("refused {:?} after {before:?}", show(id)));
        }
        c.advance(id)
            .map_err(|e| format!("mask allowed {:?} but advance failed: {e}", show(id)))?;
    }
    Ok(())
}

/// Feeds `s` as the tokenizer splits it.
fn feed_text(c: &mut JsonConstraint, s: &str) -> Result<(), String> {
    feed(c, &tokenizer().encode_plain(s).unwrap())
}

/// Feeds `s` one byte per token.
fn feed_bytes(c: &mut JsonConstraint, s: &str) -> Result<(), String> {
    let ids: Vec<u32> = s.bytes().map(byte_token).collect();
    feed(c, &ids)
}

fn byte_token(b: u8) -> u32 {
    let t = tokenizer();
    (0..t.vocab_size() as u32)
        .find(|&id| t.token_bytes(id).as_deref() == Some(&[b][..]))
        .unwrap()
}

fn accepts(schema: &OutputSchema, allowed: Option<&[&str]>, s: &str) -> Result<(), String> {
    let r1 = feed_text(&mut constraint(schema, allowed, 1000), s);
    let r2 = feed_bytes(&mut constraint(schema, allowed, 1000), s);
    assert_eq!(r1.is_ok(), r2.is_ok(), "tokens: {r1:?}, bytes: {r2:?}");
    r1
}

fn seo_json(title: &str) -> String {
    format!(r#"{{"title":"{title}","meta_description":"Fast and quiet."}}"#)
}

#[test]
fn structure_is_forced() {
    let mut c = constraint(&seo(), None, 200);
    let allowed = mask(&mut c);
    let open = b"{\"title\":\"";
    let ids: Vec<u32> = (0..allowed.len() as u32)
        .filter(|&i| allowed[i as usize])
        .collect();
    assert!(!ids.is_empty());
    for &id in &ids {
        let b = tokenizer().token_bytes(id).unwrap();
        assert!(
            open.starts_with(&b) || b.starts_with(open),
            "{:?} allowed at the start",
            show(id)
        );
    }
    assert!(ids.contains(&byte_token(b'{')));
    assert!(!allowed[tokenizer().encode_plain("Hello").unwrap()[0] as usize]);
    // a wrong key
    assert!(feed_bytes(&mut constraint(&seo(), None, 200), "{\"name\"").is_err());
    // no whitespace between the parts
    assert!(feed_bytes(&mut constraint(&seo(), None, 200), "{ ").is_err());
    // fields in order, none missing
    assert!(accepts(&seo(), None, r#"{"title":"A","meta_description":"B"}"#).is_ok());
    assert!(accepts(&seo(), None, r#"{"meta_description":"B","title":"A"}"#).is_err());
    assert!(accepts(&seo(), None, r#"{"title":"A"}"#).is_err());
}

#[test]
fn tokens_spanning_structure_and_content_are_accepted() {
    let s = r#"{"title":"Samsung Galaxy phone","meta_description":"A phone, with a screen."}"#;
    let ids = tokenizer().encode_plain(s).unwrap();
    // the tokenizer does use spanning tokens here
    let spanning = ids
        .iter()
        .filter(|&&id| {
            let b = tokenizer().token_bytes(id).unwrap();
            b.contains(&b'"') && b.len() > 1
        })
        .count();
    assert!(
        spanning >= 2,
        "{:?}",
        ids.iter().map(|&i| show(i)).collect::<Vec<_>>()
    );
    feed(&mut constraint(&seo(), None, 200), &ids).unwrap();
    // `":"` is one token in this vocabulary, and allowed right after the key
    let colon = tokenizer().token_id("\":\"").expect("\":\" is a token");
    let mut c = constraint(&seo(), None, 200);
    feed_bytes(&mut c, "{\"title").unwrap();
    assert!(mask(&mut c)[colon as usize]);
}

#[test]
fn max_chars_is_enforced() {
    let sixty = "a".repeat(60);
    assert!(accepts(&seo(), None, &seo_json(&sixty)).is_ok());
    assert!(accepts(&seo(), None, &seo_json(&"a".repeat(61))).is_err());
    let mut c = constraint(&seo(), None, 200);
    feed_bytes(&mut c, &format!("{{\"title\":\"{sixty}")).unwrap();
    let allowed = mask(&mut c);
    for id in (0..allowed.len() as u32).filter(|&i| allowed[i as usize]) {
        assert_eq!(
            tokenizer().token_bytes(id).unwrap()[0],
            b'"',
            "{:?} allowed at the limit",
            show(id)
        );
    }
    // multi-byte characters count once
    assert!(accepts(&seo(), None, &seo_json(&"é".repeat(60))).is_ok());
    assert!(accepts(&seo(), None, &seo_json(&"é".repeat(61))).is_err());
    // without a limit, the default one
    let free = OutputSchema {
        name: "x".into(),
        fields: vec![text("t", None)],
    };
    let j = |n: usize| format!(r#"{{"t":"{}"}}"#, "b".repeat(n));
    assert!(accepts(&free, None, &j(DEFAULT_MAX_CHARS)).is_ok());
    assert!(accepts(&free, None, &j(DEFAULT_MAX_CHARS + 1)).is_err());
}

#[test]
fn a_list_has_its_number_of_items() {
    let obj = |n: usize| {
        let items: Vec<String> = (0..n)
            .map(|i| format!("\"Point {}\"", "x".repeat(i + 1)))
            .collect();
        format!(r#"{{"title":"T","bullets":[{}]}}"#, items.join(","))
    };
    assert!(accepts(&amazon(), None, &obj(5)).is_ok());
    let e = accepts(&amazon(), None, &obj(4)).unwrap_err();
    assert!(e.contains(']'), "{e}");
    assert!(accepts(&amazon(), None, &obj(6)).is_err());
    let ranged = OutputSchema {
        name: "r".into(),
        fields: vec![list("l", 1, 3, Some(5))],
    };
    assert!(accepts(&ranged, None, r#"{"l":["a"]}"#).is_ok());
    assert!(accepts(&ranged, None, r#"{"l":["a","b","c"]}"#).is_ok());
    assert!(accepts(&ranged, None, r#"{"l":["a","b","c","d"]}"#).is_err());
    assert!(accepts(&ranged, None, r#"{"l":[]}"#).is_err());
    assert!(accepts(&ranged, None, r#"{"l":["abcdef"]}"#).is_err());
}

#[test]
fn strings_are_clean_utf8_and_not_blank() {
    for good in ["Größe – 日本語 😀", "¡Olé!", "a  b", "x."] {
        assert!(accepts(&seo(), None, &seo_json(good)).is_ok(), "{good}");
    }
    for bad in [
        " leading",
        "",
        "back\\slash",
        "new\nline",
        "tab\there",
        "\u{a0}nbsp",
    ] {
        let j = seo_json(&bad.replace('\n', "\\n").replace('\t', "\\t"));
        // the JSON escapes above are refused too (no backslash at all)
        assert!(accepts(&seo(), None, &j).is_err(), "{bad:?}");
        // and so are the raw characters
        let raw = format!("{{\"title\":\"{bad}\"");
        assert!(
            feed_bytes(&mut constraint(&seo(), None, 200), &raw).is_err(),
            "{bad:?}"
        );
    }
    // a character split over tokens: its bytes must follow, and be valid
    let mut c = constraint(&seo(), None, 200);
    feed_bytes(&mut c, "{\"title\":\"a").unwrap();
    let e_acute = "é".as_bytes();
    feed(&mut c, &[byte_token(e_acute[0])]).unwrap();
    let allowed = mask(&mut c);
    assert!(
        !allowed[byte_token(b'"') as usize],
        "quote inside a character"
    );
    assert!(!allowed[byte_token(b'a') as usize]);
    assert!(allowed[byte_token(e_acute[1]) as usize]);
    // overlong and surrogate encodings are not UTF-8
    let mut c = constraint(&seo(), None, 200);
    feed_bytes(&mut c, "{\"title\":\"a").unwrap();
    assert!(feed(&mut c, &[byte_token(0xE0), byte_token(0x80)]).is_err());
    let mut c = constraint(&seo(), None, 200);
    feed_bytes(&mut c, "{\"title\":\"a").unwrap();
    assert!(feed(&mut c, &[byte_token(0xED), byte_token(0xA0)]).is_err());
}

#[test]
fn after_the_object_only_end_of_turn() {
    let mut c = constraint(&seo(), None, 200);
    feed_text(&mut c, &seo_json("Title")).unwrap();
    assert!(c.is_done());
    let allowed = mask(&mut c);
    let ids: Vec<u32> = (0..allowed.len() as u32)
        .filter(|&i| allowed[i as usize])
        .collect();
    let mut eot = tokenizer().end_of_turn_ids().to_vec();
    eot.sort_unstable();
    assert_eq!(ids, eot);
    assert!(c.advance(byte_token(b' ')).is_err());
    // and end of turn is refused before the end
    let mut c = constraint(&seo(), None, 200);
    feed_bytes(&mut c, "{\"title\":\"a").unwrap();
    let allowed = mask(&mut c);
    assert!(eot.iter().all(|&id| !allowed[id as usize]));
}

#[test]
fn digits_only_copy_allowed_numbers() {
    let allowed: &[&str] = &["2.0", "30", "2000", "008", "1,000", "24"];
    let ok = |s: &str| accepts(&seo(), Some(allowed), &seo_json(s));
    assert!(ok("Intel 2.0GHz CPU").is_ok());
    assert!(ok("2.0 GHz, 30 W").is_ok());
    assert!(ok("Seagate ST2000DM008 drive").is_ok());
    assert!(ok("1,000 pages, 24 months").is_ok());
    assert!(ok("2.0").is_ok());
    assert!(ok("Ends with 30.").is_ok());
    // `3` is a prefix of `30` only
    assert!(ok("3 W").is_err());
    assert!(ok("3").is_err());
    assert!(ok("300 W").is_err());
    // `2.` is not `2.0`, and `2` alone is not allowed
    assert!(ok("It is 2. Yes").is_err());
    assert!(ok("2.5 GHz").is_err());
    assert!(ok("5 W").is_err());
    assert!(ok("1000 pages").is_err());
    assert!(ok("1,0001").is_err());
    assert!(ok("A2000").is_ok());
    // a separator between two allowed numbers joins them into one that is not
    let two: &[&str] = &["10", "9", "8"];
    assert!(accepts(&seo(), Some(two), &seo_json("10.9.8 GHz")).is_err());
    assert!(accepts(&seo(), Some(two), &seo_json("10,9")).is_err());
    assert!(accepts(&seo(), Some(two), &seo_json("10, 9 and 8.")).is_ok());
    assert!(accepts(&seo(), Some(two), &seo_json("10..9")).is_ok());
    assert!(ok("X1").is_err());
    // `2` and `2.0` both allowed: a sentence may end after `2`
    let both: &[&str] = &["2", "2.0"];
    assert!(accepts(&seo(), Some(both), &seo_json("Gen 2. Fast")).is_ok());
    assert!(accepts(&seo(), Some(both), &seo_json("Gen 2.0 fast")).is_ok());
    assert!(accepts(&seo(), Some(both), &seo_json("Gen 2.1 fast")).is_err());
    // no numbers in the spec: no digits at all
    assert!(accepts(&seo(), Some(&[]), &seo_json("Model X1")).is_err());
    assert!(accepts(&seo(), Some(&[]), &seo_json("Model X")).is_ok());
    // non-ASCII digits are never allowed
    assert!(accepts(&seo(), Some(&[]), &seo_json("٣ items")).is_err());
    assert!(accepts(&seo(), Some(&["3"]), &seo_json("٣ items")).is_err());
    // unconstrained numbers
    assert!(accepts(&seo(), None, &seo_json("1.2.3, 45 and 6")).is_ok());
}

#[test]
fn a_pending_number_must_be_finished_before_the_quote_or_the_limit() {
    let allowed: &[&str] = &["30"];
    let mut c = constraint(&seo(), Some(allowed), 200);
    feed_bytes(&mut c, "{\"title\":\"3").unwrap();
    let m = mask(&mut c);
    assert!(m[byte_token(b'0') as usize]);
    assert!(!m[byte_token(b'"') as usize]);
    assert!(!m[byte_token(b' ') as usize]);
    // at 59 characters a `3` cannot start: `30` would not fit
    let mut c = constraint(&seo(), Some(allowed), 200);
    feed_bytes(&mut c, &format!("{{\"title\":\"{}", "a".repeat(59))).unwrap();
    assert!(!mask(&mut c)[byte_token(b'3') as usize]);
    let mut c = constraint(&seo(), Some(allowed), 200);
    feed_bytes(&mut c, &format!("{{\"title\":\"{}", "a".repeat(58))).unwrap();
    assert!(mask(&mut c)[byte_token(b'3') as usize]);
}

/// Always takes the longest allowed token that is not a quote: the walk never closes a
/// string by choice.
#[test]
fn the_budget_forces_a_complete_object() {
    for (schema, max_new) in [(seo(), 36), (seo(), 60), (amazon(), 80), (amazon(), 120)] {
        let mut c = constraint(&schema, Some(&["30"]), max_new);
        let initial = c.cost(&c.state) as usize;
        assert!(max_new >= initial, "{max_new} < {initial}");
        let mut out = Vec::new();
        for _ in 0..max_new {
            let allowed = mask(&mut c);
            let pick = (0..allowed.len() as u32)
                .filter(|&i| allowed[i as usize])
                .max_by_key(|&i| {
                    let b = tokenizer().token_bytes(i).unwrap_or_default();
                    (!b.contains(&b'"'), b.len(), i)
                })
                .expect("some token is allowed");
            c.advance(pick).unwrap();
            if tokenizer().is_end_of_turn(pick) {
                break;
            }
            out.extend(tokenizer().token_bytes(pick).unwrap());
        }
        assert!(c.is_done(), "{}", String::from_utf8_lossy(&out));
        check_output(&schema, Some(&nums(&["30"])), &out);
    }
}

static NUMBER: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\d+(?:[.,]\d+)*").unwrap());

/// The output parses as the schema, within its limits, with only allowed numbers.
fn check_output(schema: &OutputSchema, allowed: Option<&[String]>, out: &[u8]) {
    let s = std::str::from_utf8(out).expect("UTF-8");
    let v: serde_json::Value = serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"));
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), schema.fields.len(), "{s}");
    let keys: Vec<&String> = obj.keys().collect();
    let mut strings = Vec::new();
    for f in &schema.fields {
        assert!(keys.contains(&&f.name), "{s}");
        match f.kind {
            FieldKind::Text { max_chars } => {
                let t = obj[&f.name].as_str().unwrap();
                assert!(t.chars().count() <= max_chars.unwrap_or(DEFAULT_MAX_CHARS));
                strings.push(t.to_string());
            }
            FieldKind::List {
                min_items,
                max_items,
                item_max_chars,
            } => {
                let items = obj[&f.name].as_array().unwrap();
                assert!((min_items..=max_items).contains(&items.len()), "{s}");
                for i in items {
                    let t = i.as_str().unwrap();
                    if f.hashtags {
                        assert!(HASHTAG.is_match(t), "{t:?} in {s}");
                    }
                    assert!(t.chars().count() <= item_max_chars.unwrap_or(DEFAULT_MAX_CHARS));
                    strings.push(t.to_string());
                }
            }
        }
    }
    for t in &strings {
        assert!(!t.is_empty() && !t.starts_with(char::is_whitespace), "{s}");
        if let Some(a) = allowed {
            for m in NUMBER.find_iter(t) {
                assert!(a.iter().any(|n| n == m.as_str()), "{} in {s}", m.as_str());
            }
        }
    }
}

static HASHTAG: std::sync::LazyLock<Regex> =
    std::sync::LazyLock::new(|| Regex::new(r"^#[\p{L}\p{N}]+$").unwrap());

#[test]
fn hashtag_items_are_a_hash_then_letters_and_digits() {
    let j = |tags: &str| format!(r#"{{"post":"A lamp.","hashtags":[{tags}]}}"#);
    for good in [
        r##""#Lamp""##,
        r##""#Lamp","#Licht2024","#Größe""##,
        r##""#日本語","#café""##,
    ] {
        assert!(accepts(&social(), None, &j(good)).is_ok(), "{good}");
    }
    for bad in [
        r##""Lamp""##,
        r##""#""##,
        r###""##Lamp""###,
        r##""#smart home""##,
        r##""#smart-home""##,
        r##""#Lamp!""##,
        r##"" #Lamp""##,
        r##""#Lamp","Desk""##,
        r##""#Lamp—x""##,
    ] {
        assert!(accepts(&social(), None, &j(bad)).is_err(), "{bad}");
    }
    // the post is free text: a space or a dash is fine there
    assert!(accepts(
        &social(),
        None,
        r##"{"post":"#smart home - yes","hashtags":["#Home"]}"##
    )
    .is_ok());
    // at a hashtag's start only tokens that begin with `#` are allowed
    let mut c = constraint(&social(), None, 200);
    feed_text(&mut c, r#"{"post":"A lamp.","hashtags":[""#).unwrap();
    let m = mask(&mut c);
    let allowed: Vec<u32> = (0..m.len() as u32).filter(|&i| m[i as usize]).collect();
    assert!(!allowed.is_empty());
    assert!(
        allowed.iter().all(|&i| show(i).starts_with('#')),
        "{:?}",
        allowed.iter().map(|&i| show(i)).collect::<Vec<_>>()
    );
}

fn walk(
    schema: &OutputSchema,
    allowed: Option<&[String]>,
    max_new: usize,
    seed: u64,
    numeric_bias: f64,
) {
    let mut c = JsonConstraint::new(schema, allowed, tokenizer(), max_new);
    let numeric_ids: std::collections::HashSet<u32> = (0..tokenizer().vocab_size() as u32)
        .filter(|&i| {
            let b = tokenizer().token_bytes(i).unwrap_or_default();
            matches!(b[..], [c] if c.is_ascii_digit() || c == b'.' || c == b',')
        })
        .collect();
    let special: std::collections::HashSet<u32> =
        tokenizer().token_table().special.iter().copied().collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut ended = false;
    for _ in 0..max_new {
        let allowed_ids: Vec<u32> = {
            let m = mask(&mut c);
            (0..m.len() as u32).filter(|&i| m[i as usize]).collect()
        };
        assert!(
            !allowed_ids.is_empty(),
            "stuck after {:?}",
            String::from_utf8_lossy(&out)
        );
        // half the time a token that is not plain text (quotes, digits, partial UTF-8)
        let interesting: Vec<u32> = allowed_ids
            .iter()
            .copied()
            .filter(|i| special.contains(i))
            .collect();
        // and often a digit or a separator, to write (and join) numbers
        let numeric: Vec<u32> = allowed_ids
            .iter()
            .copied()
            .filter(|i| numeric_ids.contains(i))
            .collect();
        let pool = if !numeric.is_empty() && rng.gen_bool(numeric_bias) {
            &numeric
        } else if !interesting.is_empty() && rng.gen_bool(0.5) {
            &interesting
        } else {
            &allowed_ids
        };
        let pick = pool[rng.gen_range(0..pool.len())];
        c.advance(pick).unwrap();
        if tokenizer().is_end_of_turn(pick) {
            ended = true;
            break;
        }
        out.extend(tokenizer().token_bytes(pick).unwrap());
    }
    assert!(ended || c.is_done(), "{}", String::from_utf8_lossy(&out));
    check_output(schema, allowed, &out);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_walks_end_in_valid_grounded_json(
        seed in any::<u64>(),
        channel in 0u8..3,
        extra in 0usize..120,
        numbers in proptest::option::of(proptest::collection::vec(
            "[0-9]{1,4}([.,][0-9]{1,3})?", 0..6)),
    ) {
        let schema = match channel {
            0 => seo(),
            1 => amazon(),
            _ => social(),
        };
        let c = JsonConstraint::new(&schema, numbers.as_deref(), tokenizer(), 0);
        let max_new = c.cost(&c.state) as usize + extra;
        walk(&schema, numbers.as_deref(), max_new, seed, 0.3);
    }
}

/// Walks that write numbers most of the time: they try every way of joining and ending them.
#[test]
fn number_heavy_walks_write_only_allowed_numbers() {
    let allowed = nums(&["1", "2", "10", "2.5", "1,000"]);
    for seed in 0..12 {
        walk(&seo(), Some(&allowed), 100, seed, 0.9);
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    /// Cost of one mask over the 49,152-token vocabulary, by state (debug builds run this
    /// crate at opt-level 0): `cargo test --lib mask_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing: run explicitly"]
    fn mask_cost() {
        let table = tokenizer().token_table();
        println!(
            "vocabulary {}, simulated inside strings: {}",
            table.vocab_size(),
            table.special_count()
        );
        let allowed: Vec<String> = nums(&["2.0", "30", "2000", "008", "1,000", "24"]);
        let cases: [(&str, &str); 5] = [
            ("structure (after `{`)", "{"),
            ("string, common state", "{\"title\":\"Seagate Barracuda"),
            ("string, number pending", "{\"title\":\"Seagate 2"),
            ("string, partial UTF-8", "{\"title\":\"Gr\u{c3}"),
            ("list separator", "{\"title\":\"T\",\"bullets\":[\"A\""),
        ];
        let t0 = std::time::Instant::now();
        let fresh = TokenTable::new(tokenizer());
        println!("building the token table: {:?}", t0.elapsed());
        drop(fresh);
        let mut buf = vec![true; table.vocab_size()];
        for (name, prefix) in cases {
            let mut c = JsonConstraint::new(&amazon(), Some(&allowed), tokenizer(), 400);
            let bytes: Vec<u8> = if prefix.ends_with('\u{c3}') {
                let mut b = prefix.trim_end_matches('\u{c3}').as_bytes().to_vec();
                b.push(0xC3);
                b
            } else {
                prefix.as_bytes().to_vec()
            };
            for b in bytes {
                c.advance(byte_token(b)).unwrap();
            }
            let n = 200;
            let t = std::time::Instant::now();
            for _ in 0..n {
                buf.fill(true);
                c.mask(&mut buf);
            }
            let ok = buf.iter().filter(|&&a| a).count();
            println!("{name}: {:?} per mask ({ok} allowed)", t.elapsed() / n);
        }
    }
}

#[test]
fn strings_stay_open_until_their_minimum_unless_the_budget_says_close() {
    let with_min = |min: usize| OutputSchema {
        name: "m".into(),
        fields: vec![SchemaField {
            min_chars: Some(min),
            ..text("title", Some(60))
        }],
    };
    let schema = with_min(10);
    assert!(accepts(&schema, None, r#"{"title":"Short"}"#).is_err());
    assert!(accepts(&schema, None, r#"{"title":"Long enough"}"#).is_ok());
    // never more than the maximum, whatever the minimum says
    assert!(accepts(
        &with_min(500),
        None,
        &format!(r#"{{"title":"{}"}}"#, "a".repeat(60))
    )
    .is_ok());
    // a tight budget closes the string before its minimum: the JSON stays complete
    let mut c = constraint(&schema, None, 15);
    feed_bytes(&mut c, r#"{"title":"Sho"#).expect("within the budget");
    let allowed = mask(&mut c);
    assert!(allowed[byte_token(b'"') as usize]);
    assert!(!allowed[byte_token(b'x') as usize]);
}
