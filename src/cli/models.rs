//! `enricher models list|fetch|verify`.

use std::process::ExitCode;

use clap::Subcommand;
use enricher::{config::Settings, models};

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// List the models of the manifest and whether each is present.
    List,
    /// Download a model (default: the default model) and check its sha256.
    Fetch {
        name: Option<String>,
        /// Download again even when present.
        #[arg(long)]
        force: bool,
    },
    /// Check a present model's sha256.
    Verify { name: Option<String> },
}

pub async fn run(settings: Settings, cmd: ModelsCommand) -> anyhow::Result<ExitCode> {
    let dir = settings.paths.models_dir.clone();
    let manifest = models::Manifest::load(&dir)?;
    match cmd {
        ModelsCommand::List => {
            for m in &manifest.models {
                let present = models::locate(&dir, &m.name).is_ok();
                println!(
                    "{}{}  {}  {}  {}",
                    m.name,
                    if m.name == manifest.default_name() {
                        " (default)"
                    } else {
                        ""
                    },
                    m.file,
                    m.license.as_deref().unwrap_or("?"),
                    if present { "present" } else { "not fetched" }
                );
            }
        }
        ModelsCommand::Fetch { name, force } => {
            let name = name.unwrap_or_else(|| manifest.default_name().to_string());
            let d = dir.clone();
            let f = tokio::task::spawn_blocking(move || models::fetch(&d, &name, force)).await??;
            println!("{} ready at {}", f.entry.name, f.path.display());
        }
        ModelsCommand::Verify { name } => {
            let name = name.unwrap_or_else(|| manifest.default_name().to_string());
            let f = models::locate(&dir, &name)?;
            tokio::task::spawn_blocking(move || models::verify(&f)).await??;
            println!("{name}: sha256 matches the manifest");
        }
    }
    Ok(ExitCode::SUCCESS)
}
