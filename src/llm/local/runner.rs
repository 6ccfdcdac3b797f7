//! The model-runner thread and the generation loop, with batched decoding.
//!
//! [`Runner`] owns a [`Generate`] implementation (the real one is [`Engine`]) on a dedicated
//! OS thread and serves requests from a channel. It keeps up to `max_batch` generations in
//! flight: a new request joins as soon as a slot is free, and then every in-flight
//! generation advances per [`Generate::step`] — by one token, or by the next chunk of its
//! prompt — in one forward pass for all of them, so the weights are read once per step
//! instead of once per sequence, and a long prompt does not stall the others' decoding
//! (continuous batching with chunked prefill). Each request carries a oneshot
//! sender for its answer. A panic inside a generation is caught, turned into
//! [`LlmError::Model`] for the requests it touched, and the engine is reset, so the next
//! request is served normally. A request whose caller has gone away (timeout, cancelled
//! task) is skipped, or dropped at the next step.
//!
//! [`Engine`] is the candle-free llama of [`super::model`]: chat template -> prompt ids ->
//! prefill in chunks (from the longest cached shared start, [`super::prefix`]) -> sample
//! on the last position's logits -> one token per step, until end of turn, `max_new_tokens` or
//! the context length. A request with a schema is decoded under a [`JsonConstraint`].
//! Because the model computes each sequence's numbers independently of the others, a
//! sequence's tokens are the same alone, in a batch, or restored from a snapshot.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use rayon::prelude::*;
use tokio::sync::oneshot;

use super::{
    chat::ChatTemplate,
    constraint::JsonConstraint,
    model::{KvCache, Model, ModelError, Step, Workspace},
    prefix::{common_prefix, PrefixCache},
    sampler::{LogitsConstraint, Sampler},
    tokenizer::GgufTokenizer,
};
use crate::llm::{GenerateRequest, Generation, LlmError};

/// Prompt tokens per forward pass during prefill. Bounds the attention work and buffers of
/// one pass; the matmuls read the weights once per chunk, so larger chunks prefill faster
/// up to the point where the activations stop fitting in cache (`enricher bench local`).
pub const PREFILL_CHUNK: usize = 128;

/// Prompt tokens per forward pass while other sequences are decoding: small enough that
/// they get a token every few tens of milliseconds, large enough that the pass runs near
/// the speed of a prompt-only one (64 gave 7% more products/min than 32 in `enricher eval`
/// with 4 in flight; 128 no clear gain over 64).
pub const MIXED_PREFILL_CHUNK: usize = 64;

/// A prompt must leave room for at least this many new tokens (or `max_new_tokens` when
/// smaller), else the request is rejected rather than answered with a stub.
pub const MIN_COMPLETION_ROOM: usize = 16;

/// A prompt takes a copy of another sequence's cache when that saves computing at least
/// this many of its tokens.
const MIN_COPY: usize = 16;

/// Where the time of one generation went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Tokenising and applying the template.
    pub tokenize: Duration,
    /// From the end of tokenising to the first answer token's logits: the forward passes
    /// that read the prompt (which may carry other sequences' tokens too).
    pub prefill: Duration,
    /// Prompt tokens whose KV cache came from a snapshot of a shared prefix (not prefilled).
    pub cached_prompt_tokens: usize,
    /// From the first token to the last (shared with the batch's other sequences).
    pub decode: Duration,
    /// The part of `decode` spent choosing this sequence's tokens (penalty, constraint, sampling).
    pub sampling: Duration,
    /// Most sequences decoded together while this one was running.
    pub batch: usize,
}

impl Timings {
    /// Prompt tokens per second of prefill.
    pub fn prompt_tokens_per_s(&self, g: &Generation) -> f64 {
        f64::from(g.prompt_tokens) / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Completion tokens per second. The first token comes from the prefill's logits, so
    /// `completion_tokens - 1` forward passes went into `decode`.
    pub fn completion_tokens_per_s(&self, g: &Generation) -> f64 {
        f64::from(g.completion_tokens.saturating_sub(1)) / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Something the runner thread can serve requests with, several at a time.
pub trait Generate: Send + 'static {
    /// One generation in progress.
    type Seq: Send;

    /// Starts a generation (which may already be done, e.g. with nothing to generate).
    /// The work is done by [`Generate::step`], so a new request costs nothing until the
    /// next pass.
    fn start(&mut self, req: &GenerateRequest) -> Result<Self::Seq, LlmError>;

    /// Advances every sequence that is not done, together: by one token, or by the next
    /// part of its prompt.
    fn step(&mut self, seqs: &mut [&mut Self::Seq]) -> Result<(), LlmError>;

    /// Whether the sequence has its answer (or failed).
    fn is_done(&self, seq: &Self::Seq) -> bool;

    /// The answer of a sequence that is done (or stopped early).
    fn finish(&mut self, seq: Self::Seq) -> Result<(Generation, Timings), LlmError>;

    /// Brings the state back to "between requests" after a failure (e.g. a panic mid-way).
    fn reset(&mut self);

    /// One whole generation, alone. `cancelled()` turns true once nobody waits for it.
    fn generate(
        &mut self,
        req: &GenerateRequest,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Generation, Timings), LlmError> {
        let mut seq = self.start(req)?;
        while !self.is_done(&seq) {
            if cancelled() {
                return Err(LlmError::Model("cancelled: the caller went away".into()));
            }
            self.step(&mut [&mut seq])?;
        }
        self.finish(seq)
    }
}

type Reply = oneshot::Sender<Result<(Generation, Timings), LlmError>>;

struct Job {
    req: GenerateRequest,
    reply: Reply,
    span: tracing::Span,
}

/// Handle to a model-runner thread. Dropping the last handle ends the thread once the
/// queued requests are done.
#[derive(Debug)]
pub struct Runner {
    tx: mpsc::Sender<Job>,
}

impl Runner {
    /// Starts the runner, which owns `engine` from now on and decodes up to `max_batch`
    /// requests together, on a thread pool of its own with `threads` threads (0: one per
    /// CPU). The serving loop runs on one of the pool's threads, so a forward pass splits
    /// its work between it and the others instead of waking a pool and waiting for it (on
    /// two cores, a third busy thread costs a third of the time in context switches).
    pub fn spawn<G: Generate>(
        engine: G,
        thread_name: &str,
        max_batch: usize,
        threads: usize,
    ) -> Result<Self, LlmError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let max_batch = max_batch.max(1);
        let name = thread_name.to_string();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(move |i| format!("{name}-{i}"))
            .build()
            .map_err(|e| LlmError::Setup(format!("starting the model runner threads: {e}")))?;
        std::thread::Builder::new()
            .name(thread_name.to_string())
            .spawn(move || pool.install(|| serve(engine, rx, max_batch)))
            .map_err(|e| LlmError::Setup(format!("starting the model runner thread: {e}")))?;
        Ok(Self { tx })
    }

    /// Queues a request and waits for its answer.
    pub async fn generate(&self, req: GenerateRequest) -> Result<(Generation, Timings), LlmError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job {
                req,
                reply,
                span: tracing::Span::current(),
            })
            .map_err(|_| LlmError::Model("the model runner thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| LlmError::Model("the model runner dropped the request".into()))?
    }
}

struct Active<S> {
    seq: S,
    reply: Reply,
    span: tracing::Span,
}

/// Runs `f` on the engine; a panic becomes an error and resets the engine.
fn guarded<G: Generate, T>(
    engine: &mut G,
    f: impl FnOnce(&mut G) -> Result<T, LlmError>,
) -> Result<T, LlmError> {
    match catch_unwind(AssertUnwindSafe(|| f(engine))) {
        Ok(r) => r,
        Err(payload) => {
            let msg = panic_message(payload.as_ref());
            tracing::error!(panic = %msg, "the model runner panicked during a generation");
            if catch_unwind(AssertUnwindSafe(|| engine.reset())).is_err() {
                tracing::error!("resetting the model after a panic panicked too");
            }
            Err(LlmError::Model(format!("generation panicked: {msg}")))
        }
    }
}

fn answer(reply: Reply, result: Result<(Generation, Timings), LlmError>) {
    if let Err(e) = &result {
        tracing::warn!(error = %e, "local generation failed");
    }
    // The caller may have gone away meanwhile: nothing to do then.
    let _ = reply.send(result);
}

fn serve<G: Generate>(mut engine: G, rx: mpsc::Receiver<Job>, max_batch: usize) {
    tracing::debug!(max_batch, "model runner started");
    let mut active: Vec<Active<G::Seq>> = Vec::new();
    loop {
        // Fill free slots: wait for work when idle, else take only what is queued.
        while active.len() < max_batch {
            let job = if active.is_empty() {
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => {
                        tracing::debug!("model runner stopped");
                        return;
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            };
            if job.reply.is_closed() {
                tracing::debug!("skipping a request whose caller is gone");
                continue;
            }
            let span = job.span;
            let started = {
                let _e = span.enter();
                guarded(&mut engine, |e| e.start(&job.req))
            };
            match started {
                Ok(seq) if engine.is_done(&seq) => {
                    let _e = span.enter();
                    let r = guarded(&mut engine, |e| e.finish(seq));
                    answer(job.reply, r);
                }
                Ok(seq) => active.push(Active {
                    seq,
                    reply: job.reply,
                    span,
                }),
                Err(e) => {
                    let _e = span.enter();
                    answer(job.reply, Err(e));
                }
            }
        }
        active.retain(|a| {
            let gone = a.reply.is_closed();
            if gone {
                let _e = a.span.enter();
                tracing::debug!("dropping a generation whose caller is gone");
            }
            !gone
        });
        if active.is_empty() {
            continue;
        }
        let stepped = {
            let mut seqs: Vec<&mut G::Seq> = active.iter_mut().map(|a| &mut a.seq).collect();
            guarded(&mut engine, |e| e.step(&mut seqs))
        };
        if let Err(e) = stepped {
            let msg = e.to_string();
            for a in active.drain(..) {
                let _e = a.span.enter();
                answer(a.reply, Err(LlmError::Model(msg.clone())));
            }
            continue;
        }
        let mut i = 0;
        while i < active.len() {
            if engine.is_done(&active[i].seq) {
                let a = active.swap_remove(i);
                let _e = a.span.enter();
                let r = guarded(&mut engine, |e| e.finish(a.seq));
                answer(a.reply, r);
            } else {
                i += 1;
            }
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".into()
    }
}

/// The constraint a request asks for: with a schema, a [`JsonConstraint`] (only one
/// compact JSON object of that shape, complete within `max_new` tokens; with
/// `allowed_numbers`, only those numbers inside its strings). Without a schema, none.
pub fn constraint_for(
    req: &GenerateRequest,
    tokenizer: &GgufTokenizer,
    max_new: usize,
) -> Option<Box<dyn LogitsConstraint>> {
    let schema = req.schema.as_ref()?;
    Some(Box::new(JsonConstraint::new(
        schema,
        req.allowed_numbers.as_deref(),
        tokenizer,
        max_new,
    )))
}

/// The model with its tokenizer and template: the real [`Generate`].
pub struct Engine {
    model: Arc<Model>,
    tokenizer: Arc<GgufTokenizer>,
    template: ChatTemplate,
    context_len: usize,
    prefill_chunk: usize,
    ws: Workspace,
    /// Logits of the last forward pass (one row of `vocab` per step).
    logits: Vec<f32>,
    /// The cache of [`Engine::prefill`] (the low-level API).
    cache: KvCache,
    /// Snapshots of the model's cache after shared prompt prefixes.
    prefixes: PrefixCache,
}

/// A generation in progress on an [`Engine`].
pub struct Seq {
    /// The prompt's ids; `cache` holds the first `cache.len()` of them while prefilling.
    prompt: Vec<u32>,
    cache: KvCache,
    /// Store a snapshot of the cache once it holds this many prompt tokens (a shared
    /// prefix being learnt).
    learn: Option<usize>,
    sampler: Sampler,
    constraint: Option<Box<dyn LogitsConstraint>>,
    generated: Vec<u32>,
    max_new: usize,
    stopped: bool,
    done: bool,
    error: Option<LlmError>,
    timings: Timings,
    started: Instant,
    decode_start: Instant,
}

impl Seq {
    /// Chooses the next token from `logits` and records it.
    fn push(&mut self, logits: &mut [f32], tokenizer: &GgufTokenizer) {
        let ts = Instant::now();
        let next = self
            .sampler
            .sample(logits, &self.generated, self.constraint.as_deref_mut());
        self.timings.sampling += ts.elapsed();
        let next = match next {
            Ok(t) => t,
            Err(e) => return self.fail(e),
        };
        self.generated.push(next);
        if let Some(c) = self.constraint.as_deref_mut() {
            if let Err(e) = c.advance(next) {
                return self.fail(LlmError::Model(format!("constraint: {e}")));
            }
        }
        if tokenizer.is_end_of_turn(next) {
            self.stopped = true;
            self.done = true;
        } else if self.generated.len() >= self.max_new {
            self.done = true;
        }
    }

    fn fail(&mut self, e: LlmError) {
        self.error = Some(e);
        self.done = true;
    }

    /// Whether prompt tokens are still to be run through the model.
    fn prefilling(&self) -> bool {
        self.generated.is_empty()
    }

    /// Leading prompt tokens of `other` whose cache this sequence can give it: those its
    /// prompt shares with `other`'s, less `other`'s last (computed to get its first answer
    /// token's logits).
    fn shares(&self, other: &Seq) -> usize {
        common_prefix(&self.prompt, &other.prompt).min(other.prompt.len().saturating_sub(1))
    }
}

fn model_err(what: &str) -> impl Fn(ModelError) -> LlmError + '_ {
    move |e| LlmError::Model(format!("{what}: {e}"))
}

impl Engine {
    pub fn new(
        model: Arc<Model>,
        tokenizer: Arc<GgufTokenizer>,
        template: ChatTemplate,
        context_len: usize,
    ) -> Self {
        let vocab = tokenizer.vocab_size();
        let cache = model.new_cache();
        Self {
            context_len: context_len.min(model.config().context),
            model,
            tokenizer,
            template,
            prefill_chunk: PREFILL_CHUNK,
            ws: Workspace::default(),
            logits: Vec::with_capacity(vocab),
            cache,
            prefixes: PrefixCache::new(true),
        }
    }

    /// Turns the reuse of shared prompt prefixes on (the default) or off.
    pub fn set_prefix_cache(&mut self, enabled: bool) {
        self.prefixes.set_enabled(enabled);
    }

    /// Snapshots of shared prefixes held now.
    pub fn prefix_snapshots(&self) -> usize {
        self.prefixes.len()
    }

    /// Bytes of K/V kept of the last prompts answered, for a later prompt that starts the
    /// same way (default [`super::prefix::REMEMBERED_BYTES`]; 0: snapshots only).
    pub fn set_remembered_bytes(&mut self, bytes: usize) {
        self.prefixes.set_remembered_bytes(bytes);
    }

    /// Prompt tokens per forward pass during prefill (default [`PREFILL_CHUNK`]).
    pub fn set_prefill_chunk(&mut self, n: usize) {
        self.prefill_chunk = n.max(1);
    }

    /// Clears the cache of [`Engine::prefill`]: the next call must start at position 0.
    pub fn clear_kv_cache(&mut self) {
        self.cache.clear();
    }

    /// Runs `tokens` through the model from position `start_pos` (the cache of this API
    /// must hold exactly the `start_pos` tokens before them), in chunks; returns the last
    /// position's logits.
    pub fn prefill(&mut self, tokens: &[u32], start_pos: usize) -> Result<&[f32], LlmError> {
        if self.cache.len() != start_pos {
            return Err(LlmError::Model(format!(
                "prefill from position {start_pos} with {} tokens cached",
                self.cache.len()
            )));
        }
        let mut cache = std::mem::take(&mut self.cache);
        let r = self.prefill_into(&mut cache, tokens);
        self.cache = cache;
        r?;
        Ok(&self.logits)
    }

    /// Runs `tokens` through the model after what `cache` holds, in chunks; leaves the last
    /// position's logits in `self.logits`.
    fn prefill_into(&mut self, cache: &mut KvCache, tokens: &[u32]) -> Result<(), LlmError> {
        if tokens.is_empty() {
            return Err(LlmError::Model("empty prompt".into()));
        }
        if cache.len() + tokens.len() > self.context_len {
            return Err(LlmError::Model(format!(
                "{} tokens from position {} exceed the context of {}",
                tokens.len(),
                cache.len(),
                self.context_len
            )));
        }
        for chunk in tokens.chunks(self.prefill_chunk) {
            self.model
                .forward(
                    &mut [Step {
                        cache: &mut *cache,
                        tokens: chunk,
                    }],
                    &mut self.ws,
                    &mut self.logits,
                )
                .map_err(model_err("forward pass over the prompt"))?;
        }
        Ok(())
    }

    /// A prompt being read that starts like another sequence in flight takes a copy of
    /// that one's cache of the shared part instead of computing it again (the same tokens
    /// give the same keys and values, bit for bit). With [`Engine::step`] letting only one
    /// of them compute a shared part, the three channels of a product, or prompts of one
    /// channel, read their common start once even when they arrive together.
    fn share_prompt_caches(&mut self, live: &mut [&mut Seq]) {
        for i in 0..live.len() {
            if !live[i].prefilling() {
                continue;
            }
            let at = live[i].cache.len();
            let donor = (0..live.len())
                .filter(|&j| j != i)
                .map(|j| (live[j].shares(&*live[i]).min(live[j].cache.len()), j))
                .max();
            let Some((n, j)) = donor.filter(|&(n, _)| n >= at + MIN_COPY) else {
                continue;
            };
            let mut cache = live[j].cache.prefix(n);
            let s = &mut *live[i];
            cache.reserve(s.prompt.len() + s.max_new, self.model.config().head_dim);
            if let Some(l) = s.learn.filter(|&l| l > at && l <= n) {
                self.prefixes.store(&s.prompt[..l], cache.prefix(l));
            }
            s.timings.cached_prompt_tokens += n - at;
            s.cache = cache;
        }
    }

    fn check_vocab(&self, rows: usize) -> Result<(), LlmError> {
        if self.logits.len() != rows * self.tokenizer.vocab_size() {
            return Err(LlmError::Model(format!(
                "the model gives {} logits for {rows} x a vocabulary of {} tokens",
                self.logits.len(),
                self.tokenizer.vocab_size()
            )));
        }
        Ok(())
    }
}

impl Generate for Engine {
    type Seq = Seq;

    fn start(&mut self, req: &GenerateRequest) -> Result<Seq, LlmError> {
        let t0 = Instant::now();
        let mut timings = Timings {
            batch: 1,
            ..Timings::default()
        };
        let prompt = self
            .template
            .encode(&self.tokenizer, &req.system, &req.user)?;
        if prompt.is_empty() {
            return Err(LlmError::Rejected("the prompt is empty".into()));
        }
        let sampler = Sampler::new(&req.sampling)?;
        let n_prompt = prompt.len();
        let wanted = req.sampling.max_new_tokens;
        let room = self.context_len.saturating_sub(n_prompt);
        if room < wanted.clamp(1, MIN_COMPLETION_ROOM) {
            return Err(LlmError::Rejected(format!(
                "the prompt is {n_prompt} tokens; with the model's context of {} tokens that \
                 leaves {room} for the answer ({wanted} requested): shorten the spec or the prompt",
                self.context_len
            )));
        }
        let max_new = wanted.min(room);
        if max_new < wanted {
            tracing::warn!(
                n_prompt,
                wanted,
                max_new,
                "the context length caps this completion"
            );
        }
        let constraint = constraint_for(req, &self.tokenizer, max_new);
        timings.tokenize = t0.elapsed();
        // The prompt is run in the passes of `step`, next to other sequences' tokens; a
        // shared start comes from a snapshot or a remembered prompt when one fits.
        let plan = self.prefixes.plan(&prompt, 1);
        timings.cached_prompt_tokens = plan.cached();
        let mut cache = plan.cache.map_or_else(|| self.model.new_cache(), |c| *c);
        cache.reserve(n_prompt + max_new, self.model.config().head_dim);
        let learn = plan.learn;
        Ok(Seq {
            prompt,
            cache,
            learn,
            sampler,
            constraint,
            generated: Vec::with_capacity(max_new),
            max_new,
            stopped: false,
            done: max_new == 0,
            error: None,
            timings,
            started: t0,
            decode_start: t0,
        })
    }

    /// One forward pass: the next token of every decoding sequence, plus the next part of
    /// the prompts still being read (up to the prefill chunk in all). A prompt chunk is
    /// compute-bound, so the decoding sequences' rows ride along at little extra cost
    /// instead of waiting for the whole prompt; with nothing decoding the chunk is the
    /// full [`PREFILL_CHUNK`], else [`MIXED_PREFILL_CHUNK`] so that decoding keeps pace.
    fn step(&mut self, seqs: &mut [&mut Seq]) -> Result<(), LlmError> {
        let mut live: Vec<&mut Seq> = seqs
            .iter_mut()
            .map(|s| &mut **s)
            .filter(|s| !s.done)
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        self.share_prompt_caches(&mut live);
        let active = live.len();
        let decoding = live.iter().filter(|s| !s.prefilling()).count();
        let mut budget = if decoding == 0 {
            self.prefill_chunk
        } else {
            self.prefill_chunk.min(MIXED_PREFILL_CHUNK)
        };
        // How many prompt tokens each sequence runs in this pass (0: not in this pass).
        let mut take: Vec<usize> = Vec::with_capacity(live.len());
        for (i, s) in live.iter().enumerate() {
            if !s.prefilling() {
                take.push(1);
                continue;
            }
            let at = s.cache.len();
            // Another prompt in this pass computes the next tokens this one needs: wait,
            // and copy them at the next step.
            let computed_by_another = live[..i]
                .iter()
                .zip(&take)
                .any(|(t, &n)| n > 0 && t.prefilling() && t.cache.len() == at && t.shares(s) > at);
            let mut n = if computed_by_another {
                0
            } else {
                (s.prompt.len() - at).min(budget)
            };
            if let Some(l) = s.learn.filter(|&l| l > at) {
                n = n.min(l - at);
            }
            budget -= n;
            take.push(n);
        }
        let mut in_pass: Vec<(&mut Seq, usize)> =
            live.into_iter().zip(take).filter(|(_, n)| *n > 0).collect();
        let n = in_pass.len();
        {
            let mut steps: Vec<Step<'_>> = in_pass
                .iter_mut()
                .map(|(s, take)| {
                    let s = &mut **s;
                    let tokens = if s.prefilling() {
                        let at = s.cache.len();
                        &s.prompt[at..at + *take]
                    } else {
                        &s.generated[s.generated.len() - 1..]
                    };
                    Step {
                        cache: &mut s.cache,
                        tokens,
                    }
                })
                .collect();
            let rows: usize = steps.iter().map(|s| s.tokens.len()).sum();
            // Keys the pass's last rows attend to, in all: what attention costs grows with.
            let context: usize = steps.iter().map(|s| s.cache.len() + s.tokens.len()).sum();
            let t = Instant::now();
            self.model
                .forward(&mut steps, &mut self.ws, &mut self.logits)
                .map_err(model_err("forward pass"))?;
            tracing::trace!(
                rows,
                active,
                seqs = n,
                decoding,
                context,
                us = t.elapsed().as_micros(),
                "pass"
            );
        }
        self.check_vocab(n)?;
        let vocab = self.tokenizer.vocab_size();
        // The sequences that choose a token now, with their rows of logits.
        let mut choosing: Vec<(&mut Seq, &mut [f32])> = Vec::with_capacity(n);
        for ((s, _), logits) in in_pass.into_iter().zip(self.logits.chunks_exact_mut(vocab)) {
            s.timings.batch = s.timings.batch.max(n);
            if s.prefilling() {
                let at = s.cache.len();
                if s.learn == Some(at) {
                    self.prefixes.store(&s.prompt[..at], s.cache.clone());
                }
                if at < s.prompt.len() {
                    continue;
                }
                // The prompt is read: these are the first answer token's logits.
                s.timings.prefill = s.started.elapsed().saturating_sub(s.timings.tokenize);
                s.decode_start = Instant::now();
            }
            choosing.push((s, logits));
        }
        // Each sequence chooses from its own logits with its own sampler, RNG and
        // constraint, so choosing in parallel gives the same tokens as one after another;
        // with a batch it keeps the pool's threads busy instead of one (~150 us per token each).
        let tokenizer = &*self.tokenizer;
        if choosing.len() > 1 {
            choosing
                .par_iter_mut()
                .for_each(|(s, logits)| s.push(logits, tokenizer));
        } else {
            for (s, logits) in choosing {
                s.push(logits, tokenizer);
            }
        }
        Ok(())
    }

    fn is_done(&self, seq: &Seq) -> bool {
        seq.done
    }

    fn finish(&mut self, seq: Seq) -> Result<(Generation, Timings), LlmError> {
        let mut timings = seq.timings;
        if let Some(e) = seq.error {
            return Err(e);
        }
        if !seq.generated.is_empty() {
            timings.decode = seq.decode_start.elapsed();
        }
        let content = if seq.stopped {
            &seq.generated[..seq.generated.len() - 1]
        } else {
            &seq.generated[..]
        };
        let mut text = self.tokenizer.decode(content, true)?;
        if !seq.stopped {
            // Cut mid-character by the token cap: drop the incomplete tail.
            while text.ends_with('\u{FFFD}') {
                text.pop();
            }
        }
        // A repair or a regeneration of this prompt may start from its cache.
        self.prefixes.remember(&seq.prompt, seq.cache);
        let g = Generation {
            text,
            prompt_tokens: u32::try_from(seq.prompt.len()).unwrap_or(u32::MAX),
            completion_tokens: u32::try_from(seq.generated.len()).unwrap_or(u32::MAX),
            finish_reason: if seq.stopped { "stop" } else { "length" }.to_string(),
        };
        tracing::debug!(
            prompt_tokens = g.prompt_tokens,
            completion_tokens = g.completion_tokens,
            finish_reason = %g.finish_reason,
            cached_prompt_tokens = timings.cached_prompt_tokens,
            prefill_ms = timings.prefill.as_millis() as u64,
            decode_ms = timings.decode.as_millis() as u64,
            sampling_ms = timings.sampling.as_millis() as u64,
            batch = timings.batch,
            "local generation done"
        );
        Ok((g, timings))
    }

    fn reset(&mut self) {
        self.cache.clear();
        self.prefixes.clear();
        self.logits.clear();
        self.ws = Workspace::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Sampling;

    fn generation(text: String) -> (Generation, Timings) {
        (
            Generation {
                text,
                prompt_tokens: 1,
                completion_tokens: 1,
                finish_reason: "stop".into(),
            },
            Timings::default(),
        )
    }

    /// Echoes the user message; panics on "panic", fails on "fail". A message "steps N"
    /// needs N steps; a step with "boom" in the batch panics.
    struct Fake {
        resets: usize,
        /// Sizes of the batches `step` was called with.
        batches: Arc<std::sync::Mutex<Vec<usize>>>,
    }

    struct FakeSeq {
        user: String,
        left: usize,
        batch: usize,
    }

    impl Fake {
        fn new() -> Self {
            Self {
                resets: 0,
                batches: Default::default(),
            }
        }
    }

    impl Generate for Fake {
        type Seq = FakeSeq;
        fn start(&mut self, req: &GenerateRequest) -> Result<FakeSeq, LlmError> {
            let left = req
                .user
                .strip_prefix("steps ")
                .and_then(|n| n.split(' ').next()?.parse().ok())
                .unwrap_or(0);
            match req.user.as_str() {
                "panic" => panic!("boom"),
                "fail" => Err(LlmError::Model("failed".into())),
                u => Ok(FakeSeq {
                    user: u.to_string(),
                    left,
                    batch: 0,
                }),
            }
        }
        fn step(&mut self, seqs: &mut [&mut FakeSeq]) -> Result<(), LlmError> {
            self.batches.lock().unwrap().push(seqs.len());
            if seqs.iter().any(|s| s.user.contains("boom")) {
                panic!("boom in a step");
            }
            let n = seqs.len();
            for s in seqs.iter_mut() {
                s.left -= 1;
                s.batch = s.batch.max(n);
            }
            // Let the other requests arrive while these run.
            std::thread::sleep(Duration::from_millis(2));
            Ok(())
        }
        fn is_done(&self, seq: &FakeSeq) -> bool {
            seq.left == 0
        }
        fn finish(&mut self, seq: FakeSeq) -> Result<(Generation, Timings), LlmError> {
            Ok(generation(format!(
                "{} (resets: {}, batch: {})",
                seq.user, self.resets, seq.batch
            )))
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn req(user: &str) -> GenerateRequest {
        GenerateRequest {
            system: String::new(),
            user: user.into(),
            sampling: Sampling::default(),
            schema: None,
            allowed_numbers: None,
        }
    }

    #[tokio::test]
    async fn a_panic_becomes_a_model_error_and_the_runner_goes_on() {
        let r = Runner::spawn(Fake::new(), "test-runner", 1, 1).unwrap();
        let e = r.generate(req("panic")).await.unwrap_err();
        assert!(
            matches!(&e, LlmError::Model(m) if m.contains("boom")),
            "{e}"
        );
        assert!(matches!(
            r.generate(req("fail")).await,
            Err(LlmError::Model(_))
        ));
        let (g, _) = r.generate(req("hello")).await.unwrap();
        assert_eq!(g.text, "hello (resets: 1, batch: 0)");
    }

    #[tokio::test]
    async fn a_cancelled_request_stops_and_frees_the_runner() {
        let r = Runner::spawn(Fake::new(), "test-runner", 1, 1).unwrap();
        let t = Instant::now();
        // 10,000 steps of 2 ms: far longer than the test waits.
        let timed_out =
            tokio::time::timeout(Duration::from_millis(50), r.generate(req("steps 10000"))).await;
        assert!(timed_out.is_err());
        let (g, _) = r.generate(req("next")).await.unwrap();
        assert_eq!(g.text, "next (resets: 0, batch: 0)");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn concurrent_requests_are_decoded_together_up_to_the_batch_size() {
        let fake = Fake::new();
        let batches = fake.batches.clone();
        let r = Arc::new(Runner::spawn(fake, "test-runner", 3, 1).unwrap());
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let r = r.clone();
                tokio::spawn(async move { r.generate(req(&format!("steps 20 r{i}"))).await })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let (g, _) = t.await.unwrap().unwrap();
            assert!(g.text.starts_with(&format!("steps 20 r{i} ")), "{}", g.text);
        }
        let batches = batches.lock().unwrap().clone();
        assert_eq!(batches.iter().max(), Some(&3), "{batches:?}");
        // 8 x 20 sequence-steps, in steps of at most 3.
        assert_eq!(batches.iter().sum::<usize>(), 160);
        assert!(batches.len() < 100, "{}", batches.len());
    }

    #[tokio::test]
    async fn a_panic_in_a_batched_step_fails_that_batch_only() {
        let r = Arc::new(Runner::spawn(Fake::new(), "test-runner", 4, 1).unwrap());
        let a = {
            let r = r.clone();
            tokio::spawn(async move { r.generate(req("steps 50 a")).await })
        };
        let b = {
            let r = r.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                r.generate(req("steps 5 boom")).await
            })
        };
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        assert!(
            matches!(&b, Err(LlmError::Model(m)) if m.contains("boom")),
            "{b:?}"
        );
        // `a` was in the same step: it fails with the same error instead of hanging.
        assert!(a.is_err(), "{a:?}");
        let (g, _) = r.generate(req("after")).await.unwrap();
        assert_eq!(g.text, "after (resets: 1, batch: 0)");
    }
}
