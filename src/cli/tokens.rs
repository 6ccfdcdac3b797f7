//! `enricher tokens create|list|revoke` (on the local database; no token needed).

use std::process::ExitCode;

use clap::Subcommand;
use enricher::{
    auth::{self, Role},
    config::Settings,
    store::{self, audit},
};

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create a token; it is printed once and cannot be shown again.
    Create {
        #[arg(long)]
        name: String,
        /// submitter, reviewer, consumer or admin; repeat or comma-separate for several.
        #[arg(long = "role", value_delimiter = ',', required = true)]
        roles: Vec<String>,
    },
    /// List tokens (without their secrets).
    List,
    /// Revoke a token by id.
    Revoke { id: String },
}

pub async fn run(settings: Settings, cmd: TokensCommand) -> anyhow::Result<ExitCode> {
    let app = super::open(settings).await?;
    let actor = format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "local".into())
    );
    match cmd {
        TokensCommand::Create { name, roles } => {
            let mut parsed = Vec::new();
            for r in &roles {
                parsed.push(Role::parse(r).ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown role `{r}` (one of: submitter, reviewer, consumer, admin)"
                    )
                })?);
            }
            let t = auth::create_token(&app.db, &name, &parsed, &actor).await?;
            audit::record(
                &app.db,
                &audit::Entry::new(&actor, "token.create", "token", &t.id)
                    .after(serde_json::json!({"name": t.name, "roles": t.roles})),
            )
            .await?;
            eprintln!(
                "token {} ({}) created with roles {}; it is shown only once:",
                t.id,
                t.name,
                t.roles
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            println!("{}", t.token);
        }
        TokensCommand::List => {
            for t in store::tokens::list(&app.db).await? {
                println!(
                    "{}  {:<20} {:<36} {}",
                    t.id,
                    t.name,
                    t.roles
                        .iter()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    if t.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    }
                );
            }
        }
        TokensCommand::Revoke { id } => {
            store::tokens::revoke(&app.db, &id).await?;
            audit::record(
                &app.db,
                &audit::Entry::new(&actor, "token.revoke", "token", &id),
            )
            .await?;
            println!("token {id} revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}
