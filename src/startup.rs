//! Building the application from settings and running it: the HTTP API and/or the queue
//! workers, until a shutdown signal.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    channel::{ChannelError, Channels},
    config::Settings,
    delivery::worker::{DeliveryError, DeliveryWorker},
    http::{AppState, HttpServer},
    llm::{LlmError, Providers},
    pipeline::Pipeline,
    prompt::{PromptError, Prompts},
    queue::{self, EnrichDeps},
    store::{Db, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Llm(#[from] LlmError),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error("binding the HTTP listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The loaded, migrated application, before anything runs.
#[derive(Clone, Debug)]
pub struct App {
    pub db: Db,
    pub settings: Arc<Settings>,
    pub channels: Arc<Channels>,
    pub prompts: Arc<Prompts>,
}

impl App {
    /// Connects and migrates the database, loads channels and prompt templates.
    pub async fn init(settings: Settings) -> Result<Self, StartupError> {
        let channels = Channels::load(&settings.paths.prompts_dir)?;
        let prompts = Prompts::load(&settings.paths.prompts_dir)?;
        prompts.check_channels(channels.all())?;
        // install the metrics recorder before anything records
        let _ = crate::telemetry::metrics();
        let db = Db::connect(&settings.database_url).await?;
        db.migrate().await?;
        tracing::info!(backend = db.backend(), channels = ?channels.names().collect::<Vec<_>>(), "application initialised");
        Ok(Self {
            db,
            settings: Arc::new(settings),
            channels: Arc::new(channels),
            prompts: Arc::new(prompts),
        })
    }

    /// Loads the providers every channel routes to (e.g. the local model) and builds the
    /// pipeline.
    pub async fn pipeline(&self) -> Result<Arc<Pipeline>, StartupError> {
        let names: Vec<String> = self.channels.names().map(str::to_string).collect();
        let providers = Providers::from_settings(&self.settings, &names).await?;
        let settings = self.settings.clone();
        let db = self.db.clone();
        let providers =
            providers.wrap(|name, p| match settings.providers.get(name) {
                Some(ps) if ps.rate_limit.is_set() => Arc::new(
                    crate::limits::LimitedProvider::new(p, db.clone(), name, ps.rate_limit.clone()),
                ),
                _ => p,
            });
        Ok(Arc::new(self.pipeline_with(providers)))
    }

    /// A pipeline over explicit providers (tests, benchmarks).
    pub fn pipeline_with(&self, providers: Providers) -> Pipeline {
        Pipeline {
            channels: self.channels.clone(),
            prompts: self.prompts.clone(),
            providers,
            settings: self.settings.clone(),
        }
    }

    pub fn http_state(&self) -> AppState {
        AppState {
            db: self.db.clone(),
            channels: self.channels.clone(),
            settings: self.settings.clone(),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Serve the HTTP API on this address (port 0 picks a free port).
    pub http: Option<SocketAddr>,
    /// Run queue workers with this pipeline.
    pub workers: Option<Arc<Pipeline>>,
    /// Name of this worker process, for the queue's registry.
    pub worker_name: String,
    /// How long running tasks get to finish after a shutdown signal.
    pub grace: Duration,
}

/// A running service; dropping it does not stop it, `shutdown()` does.
pub struct Running {
    pub http_addr: Option<SocketAddr>,
    token: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Running {
    /// A token that stops the service when cancelled.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Stops taking work, lets running tasks finish (up to the grace period), and waits.
    pub async fn shutdown(self) -> Result<(), String> {
        self.token.cancel();
        self.wait().await
    }

    /// Waits until the service stops (after a signal or a failure).
    pub async fn wait(self) -> Result<(), String> {
        let mut first_err = None;
        for t in self.tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(e.to_string());
                }
            }
        }
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// Starts the HTTP server and/or the workers.
pub async fn start(app: &App, opts: RunOptions) -> Result<Running, StartupError> {
    let token = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut http_addr = None;
    if let Some(addr) = opts.http {
        let server = HttpServer::bind(addr, app.http_state())
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        let local = server
            .local_addr()
            .map_err(|source| StartupError::Bind { addr, source })?;
        http_addr = Some(local);
        tracing::info!(addr = %local, "HTTP API listening");
        let t = token.clone();
        tasks.push(tokio::spawn(async move {
            let r = server
                .run(async move { t.cancelled().await })
                .await
                .map_err(|e| format!("HTTP server: {e}"));
            r
        }));
    }
    // Webhook delivery runs wherever queue workers run (`serve`, `worker`).
    if opts.workers.is_some() && app.settings.delivery.enabled {
        let worker = DeliveryWorker::new(
            app.db.clone(),
            &app.settings.delivery,
            &format!("{}-delivery", opts.worker_name),
        )?;
        let t = token.clone();
        tasks.push(tokio::spawn(async move {
            worker.run(t).await;
            Ok(())
        }));
    }
    if let Some(pipeline) = opts.workers {
        let deps = Arc::new(EnrichDeps {
            db: app.db.clone(),
            pipeline,
            settings: app.settings.clone(),
        });
        let t = token.clone();
        let stop_all = token.clone();
        let name = opts.worker_name.clone();
        let grace = opts.grace;
        tracing::info!(worker = %name, concurrency = app.settings.worker.concurrency, "queue workers started");
        // budget and rate-window housekeeping, while the workers run
        let (db, daily, t2) = (
            app.db.clone(),
            app.settings.budget.daily_tokens,
            token.clone(),
        );
        tokio::spawn(async move {
            loop {
                crate::limits::maintain(&db, daily).await;
                tokio::select! {
                    _ = t2.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
            }
        });
        tasks.push(tokio::spawn(async move {
            let r = queue::run_workers(deps, name, async move { t.cancelled().await }, grace)
                .await
                .map_err(|e| e.to_string());
            // Workers stopping on their own (an error) stop the whole service.
            stop_all.cancel();
            r
        }));
    }
    Ok(Running {
        http_addr,
        token,
        tasks,
    })
}

/// Resolves on SIGINT (ctrl-c) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received; finishing running tasks");
}

/// A worker name unique to this process: host and pid.
pub fn default_worker_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "host".into());
    format!("enricher-{host}-{}", std::process::id())
}
