//! The model's tokenizer, rebuilt with the `tokenizers` crate from the GGUF file's own
//! vocabulary (`tokenizer.ggml.tokens`), merges (`tokenizer.ggml.merges`) and token types
//! (`tokenizer.ggml.token_type`), so that token ids match the ones the model was trained on.
//!
//! Only byte-level BPE (`tokenizer.ggml.model = gpt2`) is supported. The pre-tokenizer follows
//! `tokenizer.ggml.pre` the way llama.cpp does:
//! - `smollm`: every digit is its own piece, then the GPT-2 regex (SmolLM/SmolLM2).
//! - `gpt2`: the GPT-2 regex alone.
//!
//! A leading space is added only when `tokenizer.ggml.add_space_prefix` says so (false for
//! SmolLM2). candle's `TokenizerFromGguf` always adds one for these models, which turns
//! `system` into `Ġsystem` and shifts every prompt's ids; that is why this module exists.
//!
//! Control tokens (token type 3, e.g. `<|im_start|>`, `<|im_end|>`, `<|endoftext|>`) are
//! registered as special tokens: [`GgufTokenizer::encode`] maps their text to their single
//! id and never splits them. [`GgufTokenizer::encode_plain`] treats their text as ordinary
//! text instead, which is what untrusted content (a product spec) must go through so that it
//! cannot open or close chat turns.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::{
    decoders::byte_level::ByteLevel as ByteLevelDecoder,
    models::bpe::{Vocab, BPE},
    pre_tokenizers::{
        byte_level::ByteLevel, digits::Digits, sequence::Sequence, PreTokenizerWrapper,
    },
    AddedToken, Tokenizer,
};

use super::constraint::TokenTable;
use crate::llm::LlmError;

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Names of tokens that end an assistant turn in the chat formats we know.
const END_OF_TURN_NAMES: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
];

/// How text is split into pieces before BPE (`tokenizer.ggml.pre`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizerKind {
    /// Digits one by one, then the GPT-2 regex (SmolLM, SmolLM2).
    SmolLm,
    /// The GPT-2 regex.
    Gpt2,
}

impl PreTokenizerKind {
    /// The kind for a `tokenizer.ggml.pre` value (`None` when the key is absent: GPT-2).
    pub fn from_gguf_name(name: Option<&str>) -> Result<Self, LlmError> {
        match name {
            Some("smollm") => Ok(Self::SmolLm),
            None | Some("gpt2") | Some("default") => Ok(Self::Gpt2),
            Some(other) => Err(LlmError::Setup(format!(
                "tokenizer pre-tokenizer `{other}` is not supported by the local provider \
                 (supported: smollm, gpt2)"
            ))),
        }
    }
}

/// What a tokenizer is built from; normally read from a GGUF file by [`GgufTokenizer::from_gguf`].
#[derive(Debug, Clone)]
pub struct TokenizerParts {
    /// The vocabulary in id order, in byte-level form (`Ġ` for a space, ...).
    pub tokens: Vec<String>,
    /// GGUF token type per id (1 normal, 3 control, 4 user-defined, ...).
    pub token_types: Vec<i32>,
    /// BPE merges, in priority order.
    pub merges: Vec<(String, String)>,
    pub pre: PreTokenizerKind,
    pub add_space_prefix: bool,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// An explicit end-of-turn id (`tokenizer.ggml.eot_token_id`), when the file has one.
    pub eot_id: Option<u32>,
}

/// A byte-level BPE tokenizer whose ids are the model's own.
#[derive(Clone)]
pub struct GgufTokenizer {
    /// Recognises control-token text as the control token.
    special: Tokenizer,
    /// Treats control-token text as ordinary text.
    plain: Tokenizer,
    tokens: Vec<String>,
    control: Vec<bool>,
    end_of_turn: Vec<u32>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    /// Byte-level alphabet: char -> byte (the inverse of GPT-2's `bytes_to_unicode`).
    char_to_byte: std::collections::HashMap<char, u8>,
    /// Per-token facts for constrained decoding, built on first use.
    token_table: std::sync::OnceLock<std::sync::Arc<TokenTable>>,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("end_of_turn", &self.end_of_turn)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

fn setup(msg: impl std::fmt::Display) -> LlmError {
    LlmError::Setup(format!("building the tokenizer from the GGUF file: {msg}"))
}

fn md<'a>(ct: &'a Content, key: &str) -> Option<&'a Value> {
    ct.metadata.get(key)
}

fn md_u32(ct: &Content, key: &str) -> Result<Option<u32>, LlmError> {
    let Some(v) = md(ct, key) else {
        return Ok(None);
    };
    let n = match v {
        Value::U8(x) => u64::from(*x),
        Value::U16(x) => u64::from(*x),
        Value::U32(x) => u64::from(*x),
        Value::U64(x) => *x,
        Value::I8(x) => u64::try_from(*x).map_err(|_| setup(format!("{key} is negative")))?,
        Value::I16(x) => u64::try_from(*x).map_err(|_| setup(format!("{key} is negative")))?,
        Value::I32(x) => u64::try_from(*x).map_err(|_| setup(format!("{key} is negative")))?,
        Value::I64(x) => u64::try_from(*x).map_err(|_| setup(format!("{key} is negative")))?,
        other => return Err(setup(format!("{key} is not an integer: {other:?}"))),
    };
    u32::try_from(n)
        .map(Some)
        .map_err(|_| setup(format!("{key} = {n} is out of range")))
}

fn md_strings(ct: &Content, key: &str) -> Result<Vec<String>, LlmError> {
    let v = md(ct, key).ok_or_else(|| setup(format!("{key} is missing")))?;
    let arr = v
        .to_vec()
        .map_err(|_| setup(format!("{key} is not an array")))?;
    arr.iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|_| setup(format!("{key} holds a non-string")))
        })
        .collect()
}

impl TokenizerParts {
    /// Reads the tokenizer's parts from GGUF metadata.
    pub fn from_gguf(ct: &Content) -> Result<Self, LlmError> {
        let kind = md(ct, "tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| setup("tokenizer.ggml.model is missing"))?;
        if kind != "gpt2" {
            return Err(setup(format!(
                "tokenizer model `{kind}` is not supported (only byte-level BPE, `gpt2`)"
            )));
        }
        let tokens = md_strings(ct, "tokenizer.ggml.tokens")?;
        let token_types = match md(ct, "tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(v) => v
                .to_vec()
                .map_err(|_| setup("tokenizer.ggml.token_type is not an array"))?
                .iter()
                .map(|v| {
                    v.to_i32()
                        .map_err(|_| setup("tokenizer.ggml.token_type holds a non-i32"))
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let merges = md_strings(ct, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| setup(format!("merge `{m}` has no space")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pre_name = md(ct, "tokenizer.ggml.pre").and_then(|v| v.to_string().ok());
        let pre = PreTokenizerKind::from_gguf_name(pre_name.map(String::as_str))?;
        let add_space_prefix = md(ct, "tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        Ok(Self {
            tokens,
            token_types,
            merges,
            pre,
            add_space_prefix,
            bos_id: md_u32(ct, "tokenizer.ggml.bos_token_id")?,
            eos_id: md_u32(ct, "tokenizer.ggml.eos_token_id")?,
            eot_id: md_u32(ct, "tokenizer.ggml.eot_token_id")?,
        })
    }
}

/// GPT-2's `bytes_to_unicode`: each byte maps to a printable char (`' '` -> `Ġ`, `'\n'` -> `Ċ`).
fn byte_level_alphabet() -> Vec<(u8, char)> {
    let mut printable: Vec<u8> = (b'!'..=b'~').collect();
    printable.extend(0xA1u8..=0xAC);
    printable.extend(0xAEu8..=0xFF);
    let mut out = Vec::with_capacity(256);
    let mut n = 0u32;
    for b in 0..=255u8 {
        let c = if printable.contains(&b) {
            u32::from(b)
        } else {
            n += 1;
            255 + n
        };
        // All values are below 0x200: always valid chars.
        if let Some(c) = char::from_u32(c) {
            out.push((b, c));
        }
    }
    out
}

impl GgufTokenizer {
    /// Builds the tokenizer from a GGUF file's metadata.
    pub fn from_gguf(ct: &Content) -> Result<Self, LlmError> {
        Self::from_parts(TokenizerParts::from_gguf(ct)?)
    }

    /// Builds the tokenizer from its parts.
    pub fn from_parts(p: TokenizerParts) -> Result<Self, LlmError> {
        if p.tokens.is_empty() {
            return Err(setup("the vocabulary is empty"));
        }
        if p.token_types.len() != p.tokens.len() {
            return Err(setup(format!(
                "{} token types for {} tokens",
                p.token_types.len(),
                p.tokens.len()
            )));
        }
        let n = u32::try_from(p.tokens.len()).map_err(|_| setup("vocabulary too large"))?;
        for (what, id) in [("bos", p.bos_id), ("eos", p.eos_id), ("eot", p.eot_id)] {
            if let Some(id) = id {
                if id >= n {
                    return Err(setup(format!("{what} id {id} is outside the vocabulary")));
                }
            }
        }
        let mut vocab = Vocab::default();
        for (id, t) in p.tokens.iter().enumerate() {
            // Ids fit in u32: checked above. A duplicate keeps its first id, as llama.cpp does.
            vocab.entry(t.clone()).or_insert(id as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, p.merges)
            .build()
            .map_err(setup)?;
        let mut special = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(p.add_space_prefix, true, true);
        let pre: PreTokenizerWrapper = match p.pre {
            PreTokenizerKind::SmolLm => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            PreTokenizerKind::Gpt2 => byte_level.into(),
        };
        special.with_pre_tokenizer(Some(pre));
        special.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));

        let control: Vec<bool> = p
            .token_types
            .iter()
            .map(|&t| t == TOKEN_TYPE_CONTROL)
            .collect();
        let added: Vec<AddedToken> = p
            .tokens
            .iter()
            .zip(&p.token_types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, &t)| {
                AddedToken::from(tok.clone(), t == TOKEN_TYPE_CONTROL).normalized(false)
            })
            .collect();
        special.add_special_tokens(added).map_err(setup)?;
        for (id, tok) in p.tokens.iter().enumerate() {
            if control[id] && special.token_to_id(tok) != Some(id as u32) {
                return Err(setup(format!(
                    "control token {tok:?} maps to {:?}, not its own id {id}",
                    special.token_to_id(tok)
                )));
            }
        }
        let mut plain = special.clone();
        plain.set_encode_special_tokens(true);

        let mut end_of_turn: Vec<u32> = [p.eos_id, p.eot_id].into_iter().flatten().collect();
        for name in END_OF_TURN_NAMES {
            if let Some(id) = p.tokens.iter().position(|t| t == name) {
                if control[id] {
                    end_of_turn.push(id as u32);
                }
            }
        }
        end_of_turn.sort_unstable();
        end_of_turn.dedup();

        Ok(Self {
            special,
            plain,
            tokens: p.tokens,
            control,
            end_of_turn,
            bos_id: p.bos_id,
            eos_id: p.eos_id,
            char_to_byte: byte_level_alphabet()
                .into_iter()
                .map(|(b, c)| (c, b))
                .collect(),
            token_table: std::sync::OnceLock::new(),
        })
    }

    /// Token ids of `text`; the text of a control token (e.g. `<|im_start|>`) becomes that
    /// token's id. For trusted text only (templates).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, LlmError> {
        encode_with(&self.special, text)
    }

    /// Token ids of `text`, where control-token text is ordinary text (it is split into
    /// normal tokens). For untrusted content.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, LlmError> {
        encode_with(&self.plain, text)
    }

    /// The text of `ids` (byte-level decoding; invalid UTF-8 becomes U+FFFD). Control tokens
    /// are left out when `skip_control` is set.
    pub fn decode(&self, ids: &[u32], skip_control: bool) -> Result<String, LlmError> {
        self.special
            .decode(ids, skip_control)
            .map_err(|e| LlmError::Model(format!("decoding tokens: {e}")))
    }

    /// The id of the vocabulary entry `token` (byte-level form: `Ġsystem` for ` system`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.special.token_to_id(token)
    }

    /// The vocabulary entry of `id`, in byte-level form.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The bytes a normal token stands for (what it adds to the text), or `None` for a
    /// control token or an unknown id. This is what a constraint on the output text needs
    /// to know about each token.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        if self.is_control(id) {
            return None;
        }
        let tok = self.tokens.get(id as usize)?;
        tok.chars()
            .map(|c| self.char_to_byte.get(&c).copied())
            .collect()
    }

    pub fn is_control(&self, id: u32) -> bool {
        self.control.get(id as usize).copied().unwrap_or(false)
    }

    /// Tokens that end the assistant's turn (eos, `<|im_end|>`, `<|endoftext|>`, ...).
    pub fn end_of_turn_ids(&self) -> &[u32] {
        &self.end_of_turn
    }

    pub fn is_end_of_turn(&self, id: u32) -> bool {
        self.end_of_turn.contains(&id)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Number of ids (the model's vocabulary size).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// What constrained decoding needs to know about each token (built once, then shared).
    pub fn token_table(&self) -> std::sync::Arc<TokenTable> {
        self.token_table
            .get_or_init(|| std::sync::Arc::new(TokenTable::new(self)))
            .clone()
    }
}

fn encode_with(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, LlmError> {
    tok.encode_fast(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| LlmError::Model(format!("encoding text: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny byte-level vocabulary: every single byte-level char of the test strings, a few
    /// merges, and two control tokens.
    fn tiny() -> GgufTokenizer {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_end|>".into()];
        let mut token_types = vec![3, 3];
        for (_, c) in byte_level_alphabet() {
            tokens.push(c.to_string());
            token_types.push(1);
        }
        let merges = vec![
            ("Ġ".to_string(), "a".to_string()),
            ("Ġa".to_string(), "b".to_string()),
            ("1".to_string(), "2".to_string()),
        ];
        for (a, b) in &merges {
            tokens.push(format!("{a}{b}"));
            token_types.push(1);
        }
        GgufTokenizer::from_parts(TokenizerParts {
            tokens,
            token_types,
            merges,
            pre: PreTokenizerKind::SmolLm,
            add_space_prefix: false,
            bos_id: None,
            eos_id: Some(1),
            eot_id: None,
        })
        .unwrap()
    }

    #[test]
    fn alphabet_is_gpt2s() {
        let a = byte_level_alphabet();
        assert_eq!(a.len(), 256);
        let get = |b: u8| a.iter().find(|(x, _)| *x == b).unwrap().1;
        assert_eq!(get(b' '), 'Ġ');
        assert_eq!(get(b'\n'), 'Ċ');
        assert_eq!(get(b'a'), 'a');
    }

    #[test]
    fn merges_apply_without_prefix_space_and_digits_split() {
        let t = tiny();
        let ab = t.token_id("Ġab").unwrap();
        let ids = t.encode("ab ab").unwrap();
        // No leading space is added: the first `ab` is `a`,`b`; the second is `Ġab`.
        assert_eq!(
            ids,
            vec![t.token_id("a").unwrap(), t.token_id("b").unwrap(), ab]
        );
        // Digits are split one by one before BPE, so the `12` merge never applies.
        let ids = t.encode("12").unwrap();
        assert_eq!(
            ids,
            vec![t.token_id("1").unwrap(), t.token_id("2").unwrap()]
        );
    }

    #[test]
    fn control_tokens_are_single_ids_except_in_plain_text() {
        let t = tiny();
        assert_eq!(t.encode("a<|im_end|>").unwrap()[1], 1);
        let plain = t.encode_plain("a<|im_end|>").unwrap();
        assert!(!plain.contains(&1), "{plain:?}");
        assert_eq!(t.decode(&plain, false).unwrap(), "a<|im_end|>");
        assert!(t.is_end_of_turn(1) && t.is_end_of_turn(0));
        assert_eq!(t.token_bytes(1), None);
        assert_eq!(t.token_bytes(t.token_id("Ġab").unwrap()).unwrap(), b" ab");
    }

    #[test]
    fn decode_round_trips_bytes() {
        let t = tiny();
        for s in ["héllo wörld\n", "😀 ab 12", "日本語"] {
            let ids = t.encode(s).unwrap();
            assert_eq!(t.decode(&ids, true).unwrap(), s);
        }
    }

    #[test]
    fn unknown_pre_tokenizer_is_a_setup_error() {
        let e = PreTokenizerKind::from_gguf_name(Some("qwen2")).unwrap_err();
        assert!(e.to_string().contains("qwen2"), "{e}");
    }
}
