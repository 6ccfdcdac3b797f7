//! Channels (seo, amazon, social, ...) defined as data.
//!
//! Each channel is one TOML file in the prompts directory (`prompts/<name>.toml`) next to its
//! tera template (`prompts/<name>.tera`). The file gives the output fields (the schema), the
//! system prompt, generation limits and the channel's rule pack (`[rules]`, versioned, read by
//! `checks`). Adding a channel means adding those two files; no Rust code.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    checks::RulePack,
    llm::{FieldKind, OutputSchema, SchemaField},
};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("reading channel definitions in {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("channel file {file}: {message}")]
    Invalid { file: PathBuf, message: String },
    #[error("no channel definitions (*.toml) found in {0}")]
    Empty(PathBuf),
    #[error("unknown channel `{name}` (known: {known})")]
    Unknown { name: String, known: String },
}

/// One output field of a channel.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct FieldDef {
    pub name: String,
    pub kind: FieldDefKind,
    /// For `list` fields: exact number of items (`items`) or a range (`min_items..max_items`).
    #[serde(default)]
    pub items: Option<usize>,
    #[serde(default)]
    pub min_items: Option<usize>,
    #[serde(default)]
    pub max_items: Option<usize>,
    /// A short description of the field for the prompt.
    #[serde(default)]
    pub describe: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FieldDefKind {
    Text,
    List,
}

/// A channel definition as read from its TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Template file name in the prompts directory; default `<name>.tera`.
    #[serde(default)]
    pub template: Option<String>,
    /// System message for the model.
    pub system: String,
    /// Cap on generated tokens for this channel (overrides the sampling default when lower).
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    pub fields: Vec<FieldDef>,
    pub rules: RulePack,
    /// Deterministic fallback copy per field (tera templates over the spec), used by the
    /// repair step when the model's text cannot be fixed without adding facts.
    #[serde(default)]
    pub fallback: BTreeMap<String, String>,
}

impl Channel {
    pub fn template_name(&self) -> String {
        self.template
            .clone()
            .unwrap_or_else(|| format!("{}.tera", self.name))
    }

    pub fn field(&self, name: &str) -> Option<&FieldDef> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// The output schema the model must follow, with the rule pack's hard limits.
    pub fn schema(&self) -> OutputSchema {
        OutputSchema {
            name: self.name.clone(),
            fields: self
                .fields
                .iter()
                .map(|f| {
                    let r = self.rules.field(&f.name);
                    SchemaField {
                        name: f.name.clone(),
                        kind: match f.kind {
                            FieldDefKind::Text => FieldKind::Text {
                                max_chars: r.and_then(|r| r.max_chars),
                            },
                            FieldDefKind::List => {
                                let (min, max) = f.item_range();
                                FieldKind::List {
                                    min_items: min,
                                    max_items: max,
                                    item_max_chars: r.and_then(|r| r.item_max_chars),
                                }
                            }
                        },
                        min_chars: r.and_then(|r| match f.kind {
                            FieldDefKind::Text => r.min_chars,
                            FieldDefKind::List => r.item_min_chars,
                        }),
                        hashtags: r.and_then(|r| r.hashtag_format) == Some(true),
                    }
                })
                .collect(),
        }
    }

    fn validate(&self, file: &Path) -> Result<(), ChannelError> {
        let bad = |message: String| ChannelError::Invalid {
            file: file.to_path_buf(),
            message,
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            return Err(bad(format!(
                "name `{}` must be lowercase letters, digits, `-` or `_`",
                self.name
            )));
        }
        if self.fields.is_empty() {
            return Err(bad("declares no [[fields]]".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in &self.fields {
            if !seen.insert(&f.name) {
                return Err(bad(format!("field `{}` is declared twice", f.name)));
            }
            if f.kind == FieldDefKind::List {
                let (min, max) = f.item_range();
                if min > max || max == 0 {
                    return Err(bad(format!(
                        "field `{}`: item range {min}..{max} is empty",
                        f.name
                    )));
                }
            }
        }
        for name in self.rules.fields.keys() {
            if self.field(name).is_none() {
                return Err(bad(format!(
                    "[rules.fields.{name}] names a field the channel does not declare"
                )));
            }
        }
        for name in self.fallback.keys() {
            if self.field(name).is_none() {
                return Err(bad(format!(
                    "[fallback] names field `{name}`, which the channel does not declare"
                )));
            }
        }
        crate::checks::check_fallback_templates(self, None).map_err(bad)?;
        Ok(())
    }
}

impl FieldDef {
    /// (min, max) items of a list field.
    pub fn item_range(&self) -> (usize, usize) {
        match (self.items, self.min_items, self.max_items) {
            (Some(n), _, _) => (n, n),
            (None, min, max) => (min.unwrap_or(1), max.unwrap_or(10)),
        }
    }
}

/// All channels, by name.
#[derive(Debug, Clone)]
pub struct Channels {
    by_name: BTreeMap<String, Channel>,
}

impl Channels {
    /// Loads every `*.toml` in `dir` as a channel definition.
    pub fn load(dir: &Path) -> Result<Self, ChannelError> {
        let io = |source| ChannelError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        let mut by_name = BTreeMap::new();
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        entries.sort();
        for path in entries {
            let text = std::fs::read_to_string(&path).map_err(io)?;
            let ch = Self::parse(&text, &path)?;
            if by_name.contains_key(&ch.name) {
                return Err(ChannelError::Invalid {
                    file: path,
                    message: format!("channel `{}` is defined twice", ch.name),
                });
            }
            by_name.insert(ch.name.clone(), ch);
        }
        if by_name.is_empty() {
            return Err(ChannelError::Empty(dir.to_path_buf()));
        }
        Ok(Self { by_name })
    }

    pub fn parse(text: &str, path: &Path) -> Result<Channel, ChannelError> {
        let ch: Channel = toml::from_str(text).map_err(|e| ChannelError::Invalid {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
        ch.validate(path)?;
        Ok(ch)
    }

    pub fn get(&self, name: &str) -> Result<&Channel, ChannelError> {
        self.by_name.get(name).ok_or_else(|| ChannelError::Unknown {
            name: name.to_string(),
            known: self.names().collect::<Vec<_>>().join(", "),
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn all(&self) -> impl Iterator<Item = &Channel> {
        self.by_name.values()
    }

    /// Resolves a job's channel list: empty means all; unknown names are an error naming them.
    pub fn resolve(&self, requested: &[String]) -> Result<Vec<String>, ChannelError> {
        if requested.is_empty() {
            return Ok(self.names().map(str::to_string).collect());
        }
        let mut out: Vec<String> = Vec::new();
        for r in requested {
            let name = r.trim();
            self.get(name)?;
            if !out.iter().any(|o| o == name) {
                out.push(name.to_string());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompts_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts")
    }

    #[test]
    fn shipped_channels_load_with_their_schemas() {
        let ch = Channels::load(&prompts_dir()).unwrap();
        let names: Vec<_> = ch.names().collect();
        for n in ["amazon", "seo", "social"] {
            assert!(names.contains(&n), "{names:?}");
        }
        let amazon = ch.get("amazon").unwrap().schema();
        let bullets = amazon.fields.iter().find(|f| f.name == "bullets").unwrap();
        assert!(matches!(
            bullets.kind,
            FieldKind::List {
                min_items: 5,
                max_items: 5,
                ..
            }
        ));
        let seo = ch.get("seo").unwrap().schema();
        let names: Vec<_> = seo.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["title", "meta_description"]);
        let social = ch.get("social").unwrap().schema();
        let names: Vec<_> = social.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["post", "caption", "hashtags"]);
    }

    #[test]
    fn resolve_defaults_to_all_and_rejects_unknown_names() {
        let ch = Channels::load(&prompts_dir()).unwrap();
        assert_eq!(ch.resolve(&[]).unwrap().len(), ch.names().count());
        let e = ch.resolve(&["seo".into(), "tiktok".into()]).unwrap_err();
        assert!(e.to_string().contains("unknown channel `tiktok`"), "{e}");
        assert_eq!(ch.resolve(&["seo".into(), "seo".into()]).unwrap(), ["seo"]);
    }

    #[test]
    fn invalid_definitions_are_reported_with_the_file() {
        let e = Channels::parse(
            "name = \"x\"\nsystem = \"s\"\nfields = []\n[rules]\nversion = \"1\"\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("x.toml"), "{e}");
        let e = Channels::parse(
            "name = \"x\"\nsystem = \"s\"\n[[fields]]\nname = \"t\"\nkind = \"text\"\n[rules]\nversion = \"1\"\n[rules.fields.nope]\nmax_chars = 3\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
