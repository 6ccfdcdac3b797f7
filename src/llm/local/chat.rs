//! Chat templates: how a system and a user message become the model's prompt tokens.
//!
//! The template's own markers (`<|im_start|>`, `<|im_end|>`) are control tokens; the
//! messages are encoded as plain text, so a product spec that happens to contain
//! `<|im_end|>` cannot end its turn early or forge another role's turn. For text without
//! control-token strings the ids are exactly those of tokenizing the rendered template
//! (the tokenizer splits at control tokens before pre-tokenizing, so encoding piece by piece
//! gives the same result).

use super::tokenizer::GgufTokenizer;
use crate::llm::LlmError;

/// The chat formats the local provider knows (`chat_template` in `models/models.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\n{content}<|im_end|>\n`, then `<|im_start|>assistant\n`.
    ChatMl,
}

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

impl ChatTemplate {
    pub fn from_name(name: &str) -> Result<Self, LlmError> {
        match name {
            "chatml" => Ok(Self::ChatMl),
            other => Err(LlmError::Setup(format!(
                "chat template `{other}` is not supported by the local provider (supported: chatml)"
            ))),
        }
    }

    /// The prompt as text. An empty system message leaves out the system turn.
    pub fn render(&self, system: &str, user: &str) -> String {
        match self {
            Self::ChatMl => {
                let mut s = String::with_capacity(system.len() + user.len() + 64);
                if !system.is_empty() {
                    s.push_str(&format!("{IM_START}system\n{system}{IM_END}\n"));
                }
                s.push_str(&format!("{IM_START}user\n{user}{IM_END}\n"));
                s.push_str(&format!("{IM_START}assistant\n"));
                s
            }
        }
    }

    /// The prompt's token ids: control tokens from the template only, messages as plain text.
    pub fn encode(
        &self,
        tok: &GgufTokenizer,
        system: &str,
        user: &str,
    ) -> Result<Vec<u32>, LlmError> {
        match self {
            Self::ChatMl => {
                let start = control_id(tok, IM_START)?;
                let end = control_id(tok, IM_END)?;
                let mut ids = Vec::with_capacity((system.len() + user.len()) / 3 + 16);
                let mut turn = |role: &str, content: &str| -> Result<(), LlmError> {
                    ids.push(start);
                    ids.extend(tok.encode_plain(&format!("{role}\n{content}"))?);
                    ids.push(end);
                    ids.extend(tok.encode_plain("\n")?);
                    Ok(())
                };
                if !system.is_empty() {
                    turn("system", system)?;
                }
                turn("user", user)?;
                ids.push(start);
                ids.extend(tok.encode_plain("assistant\n")?);
                Ok(ids)
            }
        }
    }
}

fn control_id(tok: &GgufTokenizer, name: &str) -> Result<u32, LlmError> {
    tok.token_id(name)
        .filter(|&id| tok.is_control(id))
        .ok_or_else(|| {
            LlmError::Setup(format!(
                "the chat template needs the control token {name}, which the vocabulary lacks"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_the_documented_format() {
        let t = ChatTemplate::from_name("chatml").unwrap();
        assert_eq!(
            t.render("Be brief.", "Hi"),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render("", "Hi"),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(ChatTemplate::from_name("llama2").is_err());
    }
}
