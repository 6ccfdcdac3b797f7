//! The model-runner thread and the generation loop.
//!
//! [`Runner`] owns a [`Generate`] implementation (the real one is [`Engine`]) on a dedicated
//! OS thread and serves requests from a channel, one at a time: candle's forward pass is
//! CPU-bound and needs `&mut` access to the KV cache, so it never runs on the async runtime.
//! Each request carries a oneshot sender for its answer. A panic inside a generation is
//! caught, turned into [`LlmError::Model`], and the engine is reset, so the next request is
//! served normally. A request whose caller has gone away (timeout, cancelled task) is
//! skipped, or stopped at the next token.
//!
//! [`Engine::generate`] is the loop: chat template -> prompt ids -> chunked prefill ->
//! sample / forward one token at a time on the last position's logits, until end of turn,
//! `max_new_tokens` or the context length.
//!
//! Where later work slots in:
//! - Constrained decoding: [`constraint_for`] builds a [`LogitsConstraint`] from the
//!   request (schema, allowed numbers: [`JsonConstraint`]); the loop masks and advances it
//!   every step.
//! - Prompt-prefix reuse ([`super::prefix`]): the prompt is prefilled from the longest
//!   snapshot of the model taken after a shared prefix (system prompt + channel
//!   instructions), so only the spec part is prefilled for each product.
//! - Batching: the runner's queue is where several waiting jobs would be drained together;
//!   candle's `quantized_llama` forward shares one position (and KV length) across the
//!   batch, so batching requests of different lengths needs a model forward of our own.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use candle_core::{Device, Storage, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use tokio::sync::oneshot;

use super::{
    chat::ChatTemplate,
    constraint::JsonConstraint,
    prefix::{Plan, PrefixCache},
    sampler::{LogitsConstraint, Sampler},
    tokenizer::GgufTokenizer,
};
use crate::llm::{GenerateRequest, Generation, LlmError};

/// Prompt tokens per forward pass during prefill. Bounds the attention scores' memory
/// (heads x chunk x context floats) for long prompts, and is the granularity of prefix
/// snapshots ([`super::prefix`]). Quantised matmuls work row by row, so on CPU a 64-token
/// chunk prefills about as fast as a 512-token one (`enricher bench local`).
pub const PREFILL_CHUNK: usize = 64;

/// A prompt must leave room for at least this many new tokens (or `max_new_tokens` when
/// smaller), else the request is rejected rather than answered with a stub.
pub const MIN_COMPLETION_ROOM: usize = 16;

/// Where the time of one generation went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Tokenising and applying the template.
    pub tokenize: Duration,
    /// Forward passes over the prompt (up to the first sampled token's logits).
    pub prefill: Duration,
    /// Prompt tokens whose KV cache came from a snapshot of a shared prefix (not prefilled).
    pub cached_prompt_tokens: usize,
    /// Sampling and forward passes for the completion.
    pub decode: Duration,
    /// The part of `decode` spent choosing tokens (penalty, constraint, sampling).
    pub sampling: Duration,
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

/// Something the runner thread can serve requests with.
pub trait Generate: Send + 'static {
    /// One generation. `cancelled()` turns true once nobody waits for the answer.
    fn generate(
        &mut self,
        req: &GenerateRequest,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Generation, Timings), LlmError>;

    /// Brings the state back to "between requests" after a failure (e.g. a panic mid-way).
    fn reset(&mut self);
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
    /// Starts the runner thread, which owns `engine` from now on.
    pub fn spawn<G: Generate>(engine: G, thread_name: &str) -> Result<Self, LlmError> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(thread_name.to_string())
            .spawn(move || serve(engine, rx))
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

fn serve<G: Generate>(mut engine: G, rx: mpsc::Receiver<Job>) {
    tracing::debug!("model runner started");
    while let Ok(job) = rx.recv() {
        let _span = job.span.enter();
        if job.reply.is_closed() {
            tracing::debug!("skipping a request whose caller is gone");
            continue;
        }
        let reply = &job.reply;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            engine.generate(&job.req, &|| reply.is_closed())
        }));
        let result = match outcome {
            Ok(r) => r,
            Err(payload) => {
                let msg = panic_message(payload.as_ref());
                tracing::error!(panic = %msg, "the model runner panicked during a generation");
                if catch_unwind(AssertUnwindSafe(|| engine.reset())).is_err() {
                    tracing::error!("resetting the model after a panic panicked too");
                }
                Err(LlmError::Model(format!("generation panicked: {msg}")))
            }
        };
        if let Err(e) = &result {
            tracing::warn!(error = %e, "local generation failed");
        }
        // The caller may have gone away meanwhile: nothing to do then.
        let _ = job.reply.send(result);
    }
    tracing::debug!("model runner stopped");
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

/// The candle model with its tokenizer and template: the real [`Generate`].
pub struct Engine {
    model: ModelWeights,
    tokenizer: Arc<GgufTokenizer>,
    template: ChatTemplate,
    context_len: usize,
    prefill_chunk: usize,
    device: Device,
    /// The last position's logits, reused across steps.
    logits: Vec<f32>,
    /// Snapshots of the model after shared prompt prefixes.
    prefixes: PrefixCache,
}

fn model_err(what: &str) -> impl Fn(candle_core::Error) -> LlmError + '_ {
    move |e| LlmError::Model(format!("{what}: {e}"))
}

impl Engine {
    pub fn new(
        model: ModelWeights,
        tokenizer: Arc<GgufTokenizer>,
        template: ChatTemplate,
        context_len: usize,
    ) -> Self {
        let vocab = tokenizer.vocab_size();
        Self {
            model,
            tokenizer,
            template,
            context_len,
            prefill_chunk: PREFILL_CHUNK,
            device: Device::Cpu,
            logits: Vec::with_capacity(vocab),
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

    /// Prefills `prompt` from the longest snapshot it starts with (learning a new one when
    /// it shares a long enough start with a recent prompt); returns the last position's
    /// logits and how many prompt tokens came from a snapshot.
    fn prefill_prompt(&mut self, prompt: &[u32]) -> Result<(Tensor, usize), LlmError> {
        match self.prefixes.plan(prompt, self.prefill_chunk) {
            Plan::Restore { model, len } => {
                self.model = *model;
                Ok((self.prefill(&prompt[len..], len)?, len))
            }
            Plan::Learn { len } => {
                self.model.clear_kv_cache();
                self.prefill(&prompt[..len], 0)?;
                self.prefixes.store(&prompt[..len], self.model.clone());
                Ok((self.prefill(&prompt[len..], len)?, 0))
            }
            Plan::Plain => {
                self.model.clear_kv_cache();
                Ok((self.prefill(prompt, 0)?, 0))
            }
        }
    }

    /// Prompt tokens per forward pass during prefill (default [`PREFILL_CHUNK`]).
    pub fn set_prefill_chunk(&mut self, n: usize) {
        self.prefill_chunk = n.max(1);
    }

    /// Clears the KV cache: the next [`Engine::prefill`] must start at position 0.
    pub fn clear_kv_cache(&mut self) {
        self.model.clear_kv_cache();
    }

    /// Runs `tokens` through the model from position `start_pos` (the KV cache must hold
    /// exactly the `start_pos` tokens before them), in chunks; returns the last position's
    /// logits, shape `(1, vocab)`.
    pub fn prefill(&mut self, tokens: &[u32], start_pos: usize) -> Result<Tensor, LlmError> {
        if start_pos + tokens.len() > self.context_len {
            return Err(LlmError::Model(format!(
                "{} tokens from position {start_pos} exceed the context of {}",
                tokens.len(),
                self.context_len
            )));
        }
        // Chunks end at multiples of the chunk size (counted from position 0, not from
        // `start_pos`): a prompt prefilled from a snapshot taken at such a boundary goes
        // through exactly the same forward passes as when prefilled whole, so the numbers
        // (and the tokens) are the same.
        let mut last = None;
        let mut pos = start_pos;
        let mut rest = tokens;
        while !rest.is_empty() {
            let take = (self.prefill_chunk - pos % self.prefill_chunk).min(rest.len());
            let (chunk, tail) = rest.split_at(take);
            let input = Tensor::from_slice(chunk, (1, chunk.len()), &self.device)
                .map_err(model_err("prompt tensor"))?;
            last = Some(
                self.model
                    .forward(&input, pos)
                    .map_err(model_err("forward pass over the prompt"))?,
            );
            pos += take;
            rest = tail;
        }
        last.ok_or_else(|| LlmError::Model("empty prompt".into()))
    }

    /// Copies a `(1, vocab)` logits tensor into the reused buffer, without allocating.
    fn load_logits(&mut self, t: &Tensor) -> Result<(), LlmError> {
        let t = t.flatten_all().map_err(model_err("logits"))?;
        {
            let (storage, layout) = t.storage_and_layout();
            if let (Storage::Cpu(cpu), Some((from, to))) = (&*storage, layout.contiguous_offsets())
            {
                if let Ok(s) = cpu.as_slice::<f32>() {
                    self.logits.clear();
                    self.logits.extend_from_slice(&s[from..to]);
                    return self.check_vocab();
                }
            }
        }
        self.logits = t
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(model_err("logits"))?;
        self.check_vocab()
    }

    fn check_vocab(&self) -> Result<(), LlmError> {
        if self.logits.len() != self.tokenizer.vocab_size() {
            return Err(LlmError::Model(format!(
                "the model gives {} logits for a vocabulary of {} tokens",
                self.logits.len(),
                self.tokenizer.vocab_size()
            )));
        }
        Ok(())
    }
}

impl Generate for Engine {
    fn generate(
        &mut self,
        req: &GenerateRequest,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Generation, Timings), LlmError> {
        let t0 = Instant::now();
        let mut timings = Timings::default();
        let prompt = self
            .template
            .encode(&self.tokenizer, &req.system, &req.user)?;
        let mut sampler = Sampler::new(&req.sampling)?;
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
        let mut constraint = constraint_for(req, &self.tokenizer, max_new);
        timings.tokenize = t0.elapsed();
        let generation = |text: String, completion: usize, finish: &str| Generation {
            text,
            prompt_tokens: u32::try_from(n_prompt).unwrap_or(u32::MAX),
            completion_tokens: u32::try_from(completion).unwrap_or(u32::MAX),
            finish_reason: finish.to_string(),
        };
        if max_new == 0 {
            return Ok((generation(String::new(), 0, "length"), timings));
        }

        let t1 = Instant::now();
        let (logits, cached) = self.prefill_prompt(&prompt)?;
        self.load_logits(&logits)?;
        timings.prefill = t1.elapsed();
        timings.cached_prompt_tokens = cached;

        let t2 = Instant::now();
        let mut generated: Vec<u32> = Vec::with_capacity(max_new);
        let mut stopped = false;
        loop {
            if cancelled() {
                return Err(LlmError::Model("cancelled: the caller went away".into()));
            }
            let ts = Instant::now();
            let next = sampler.sample(&mut self.logits, &generated, constraint.as_deref_mut())?;
            timings.sampling += ts.elapsed();
            generated.push(next);
            if let Some(c) = constraint.as_deref_mut() {
                c.advance(next)
                    .map_err(|e| LlmError::Model(format!("constraint: {e}")))?;
            }
            if self.tokenizer.is_end_of_turn(next) {
                stopped = true;
                break;
            }
            if generated.len() >= max_new {
                break;
            }
            let pos = n_prompt + generated.len() - 1;
            let input = Tensor::from_slice(&[next], (1, 1), &self.device)
                .map_err(model_err("token tensor"))?;
            let logits = self
                .model
                .forward(&input, pos)
                .map_err(model_err("forward pass"))?;
            self.load_logits(&logits)?;
        }
        timings.decode = t2.elapsed();

        let content = if stopped {
            &generated[..generated.len() - 1]
        } else {
            &generated[..]
        };
        let mut text = self.tokenizer.decode(content, true)?;
        if !stopped {
            // Cut mid-character by the token cap: drop the incomplete tail.
            while text.ends_with('\u{FFFD}') {
                text.pop();
            }
        }
        let g = generation(
            text,
            generated.len(),
            if stopped { "stop" } else { "length" },
        );
        tracing::debug!(
            prompt_tokens = g.prompt_tokens,
            completion_tokens = g.completion_tokens,
            finish_reason = %g.finish_reason,
            prefill_ms = timings.prefill.as_millis() as u64,
            decode_ms = timings.decode.as_millis() as u64,
            "local generation done"
        );
        Ok((g, timings))
    }

    fn reset(&mut self) {
        self.model.clear_kv_cache();
        self.prefixes.clear();
        self.logits.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Sampling;

    /// Echoes the user message; panics on "panic", fails on "fail".
    struct Fake {
        resets: usize,
    }

    impl Generate for Fake {
        fn generate(
            &mut self,
            req: &GenerateRequest,
            _cancelled: &dyn Fn() -> bool,
        ) -> Result<(Generation, Timings), LlmError> {
            match req.user.as_str() {
                "panic" => panic!("boom"),
                "fail" => Err(LlmError::Model("failed".into())),
                u => Ok((
                    Generation {
                        text: format!("{u} (resets: {})", self.resets),
                        prompt_tokens: 1,
                        completion_tokens: 1,
                        finish_reason: "stop".into(),
                    },
                    Timings::default(),
                )),
            }
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
        let r = Runner::spawn(Fake { resets: 0 }, "test-runner").unwrap();
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
        assert_eq!(g.text, "hello (resets: 1)");
    }

    #[tokio::test]
    async fn a_cancelled_request_stops_and_frees_the_runner() {
        struct Spin;
        impl Generate for Spin {
            fn generate(
                &mut self,
                req: &GenerateRequest,
                cancelled: &dyn Fn() -> bool,
            ) -> Result<(Generation, Timings), LlmError> {
                let t = Instant::now();
                while req.user == "spin" && t.elapsed() < Duration::from_secs(20) {
                    if cancelled() {
                        return Err(LlmError::Model("cancelled".into()));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok((
                    Generation {
                        text: req.user.clone(),
                        prompt_tokens: 0,
                        completion_tokens: 0,
                        finish_reason: "stop".into(),
                    },
                    Timings::default(),
                ))
            }
            fn reset(&mut self) {}
        }
        let r = Runner::spawn(Spin, "test-runner").unwrap();
        let t = Instant::now();
        let timed_out =
            tokio::time::timeout(Duration::from_millis(50), r.generate(req("spin"))).await;
        assert!(timed_out.is_err());
        let (g, _) = r.generate(req("next")).await.unwrap();
        assert_eq!(g.text, "next");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn concurrent_requests_are_all_served() {
        let r = Arc::new(Runner::spawn(Fake { resets: 0 }, "test-runner").unwrap());
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let r = r.clone();
                tokio::spawn(async move { r.generate(req(&format!("r{i}"))).await })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let (g, _) = t.await.unwrap().unwrap();
            assert!(g.text.starts_with(&format!("r{i} ")));
        }
    }
}
