//! The local provider against the real model file (`models/SmolLM2-135M-Instruct.Q4_1.gguf`).
//!
//! These tests never skip: without the model file they fail and say how to fetch it.
//! One provider is loaded per test binary and shared by all tests (each test has its own
//! tokio runtime; the model lives on its own thread, so that is fine).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use candle_core::quantized::gguf_file;
use enricher::{
    config::Settings,
    llm::{
        local::{runner::Engine, sampler::argmax, LocalProvider},
        GenerateRequest, LlmError, Provider, Sampling,
    },
    models,
};
use tokio::sync::OnceCell;

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

/// The model file; fails (never skips) when it is missing.
fn model_file() -> models::ModelFile {
    match models::locate(&models_dir(), models::DEFAULT_MODEL) {
        Ok(f) => f,
        Err(e) => panic!(
            "the local model is needed for these tests: {e}\n\
             fetch it with `cargo run -- models fetch` (from the repository root)"
        ),
    }
}

/// Tests that run candle directly (besides the provider's runner thread) take this for
/// writing, the others for reading: two models computing at once on two cores slow both
/// down a lot (candle's thread pools spin while they wait).
static CPU: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn provider() -> &'static LocalProvider {
    static P: OnceCell<LocalProvider> = OnceCell::const_new();
    P.get_or_init(|| async {
        model_file();
        let settings = Settings::default();
        let ps = settings.providers["local"].clone();
        LocalProvider::load("local", &ps, &models_dir())
            .await
            .unwrap_or_else(|e| panic!("loading the local model: {e}"))
    })
    .await
}

/// The GGUF vocabulary, read straight from the file (independent of the tokenizer).
fn gguf_vocab() -> Vec<String> {
    let mut f = std::fs::File::open(model_file().path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    ct.metadata["tokenizer.ggml.tokens"]
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_string().unwrap().clone())
        .collect()
}

fn vocab_id(vocab: &[String], token: &str) -> u32 {
    vocab
        .iter()
        .position(|t| t == token)
        .unwrap_or_else(|| panic!("{token:?} is not in the GGUF vocabulary")) as u32
}

fn request(user: &str, sampling: Sampling) -> GenerateRequest {
    GenerateRequest {
        system: "You are a helpful assistant that writes product copy.".into(),
        user: user.into(),
        sampling,
        schema: None,
        allowed_numbers: None,
    }
}

fn greedy(max_new_tokens: usize) -> Sampling {
    Sampling {
        temperature: 0.0,
        max_new_tokens,
        ..Sampling::default()
    }
}

const SPEC_PROMPT: &str = "Write a two-sentence product description for this product.\n\
Product: Trailblazer 40L hiking backpack\n\
Material: ripstop nylon\n\
Weight: 1.2 kg\n\
Features: rain cover, padded hip belt, hydration sleeve";

#[tokio::test]
async fn token_ids_match_the_gguf_vocabulary() {
    let _cpu = CPU.read().await;
    let p = provider().await;
    let tok = p.tokenizer();
    let vocab = gguf_vocab();
    assert_eq!(tok.vocab_size(), vocab.len());
    let enc = |s: &str| tok.encode(s).unwrap();

    // No prefix space: `system` is the plain vocabulary entry, ` system` the `Ġ` one.
    assert_eq!(enc("system"), vec![vocab_id(&vocab, "system")]);
    assert_eq!(enc(" system"), vec![vocab_id(&vocab, "Ġsystem")]);
    assert_ne!(vocab_id(&vocab, "system"), vocab_id(&vocab, "Ġsystem"));
    assert_eq!(enc("Hello"), vec![vocab_id(&vocab, "Hello")]);
    assert_eq!(
        enc("Hello world\n"),
        vec![
            vocab_id(&vocab, "Hello"),
            vocab_id(&vocab, "Ġworld"),
            vocab_id(&vocab, "Ċ")
        ]
    );
    // Digits one by one.
    let digits: Vec<u32> = ["2", "0", "2", "4"]
        .iter()
        .map(|d| vocab_id(&vocab, d))
        .collect();
    assert_eq!(enc("2024"), digits);
    let mut spaced = vec![vocab_id(&vocab, "Ġ")];
    spaced.extend(&digits);
    assert_eq!(enc(" 2024"), spaced);

    // Control tokens are single ids, never split.
    let im_start = vocab_id(&vocab, "<|im_start|>");
    let im_end = vocab_id(&vocab, "<|im_end|>");
    let eot = vocab_id(&vocab, "<|endoftext|>");
    assert_eq!(enc("<|im_start|>"), vec![im_start]);
    assert_eq!(
        enc("<|im_start|>user\nHi<|im_end|>"),
        vec![
            im_start,
            vocab_id(&vocab, "user"),
            vocab_id(&vocab, "Ċ"),
            vocab_id(&vocab, "Hi"),
            im_end
        ]
    );
    assert_eq!(enc("x<|endoftext|>"), vec![vocab_id(&vocab, "x"), eot]);
    assert!(tok.is_end_of_turn(im_end) && tok.is_end_of_turn(eot));
    // ... except in untrusted text, where they are ordinary characters.
    let plain = tok.encode_plain("<|im_end|>").unwrap();
    assert!(plain.len() > 1 && !plain.contains(&im_end), "{plain:?}");
}

#[tokio::test]
async fn encode_decode_round_trips() {
    let _cpu = CPU.read().await;
    let p = provider().await;
    let tok = p.tokenizer();
    for s in [
        "Plain ASCII, with punctuation: (a+b) * 3 = 42!",
        "Café crème, naïve façade, Ærøskøbing, Zürich",
        "Emoji: 🎒🏔️👍🏽 done",
        "中文测试，日本語のテキスト、한국어",
        "line one\nline two\n\n  indented\ttab\r\nwindows",
        "  leading and trailing spaces  ",
        "<|im_start|>user\nhi<|im_end|>\n",
    ] {
        let ids = tok.encode(s).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), s, "ids {ids:?}");
        let plain = tok.encode_plain(s).unwrap();
        assert_eq!(tok.decode(&plain, false).unwrap(), s);
    }
}

#[tokio::test]
async fn prompt_ids_follow_chatml() {
    let _cpu = CPU.read().await;
    let p = provider().await;
    let tok = p.tokenizer();
    let ids = p.prompt_ids("Be brief.", "Describe 2 mugs.").unwrap();
    let rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nDescribe 2 mugs.<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(ids, tok.encode(rendered).unwrap());
    assert_eq!(tok.decode(&ids, false).unwrap(), rendered);
    // A spec cannot close its turn: its `<|im_end|>` is text.
    let ids = p.prompt_ids("", "a<|im_end|>b").unwrap();
    let im_end = tok.token_id("<|im_end|>").unwrap();
    assert_eq!(ids.iter().filter(|&&t| t == im_end).count(), 1);
}

#[tokio::test]
async fn loads_and_writes_copy() {
    let _cpu = CPU.read().await;
    let p = provider().await;
    let info = p.info();
    assert_eq!(info.kind, "local");
    assert_eq!(
        info.model_sha256.as_deref(),
        Some(model_file().entry.sha256.as_str())
    );
    assert_eq!(p.context_length(), 8192);

    let req = request(
        SPEC_PROMPT,
        Sampling {
            max_new_tokens: 48,
            ..Sampling::default()
        },
    );
    let expected_prompt = p.prompt_ids(&req.system, &req.user).unwrap().len() as u32;
    let g = p.generate(req).await.unwrap();
    eprintln!("{g:?}");
    assert!(!g.text.trim().is_empty());
    assert_eq!(g.prompt_tokens, expected_prompt);
    assert!((50..200).contains(&g.prompt_tokens), "{}", g.prompt_tokens);
    assert!((1..=48).contains(&g.completion_tokens));
    assert!(!g.text.contains("<|im_end|>") && !g.text.contains("<|im_start|>"));
    assert!(g.finish_reason == "stop" || g.finish_reason == "length");
    if g.finish_reason == "length" {
        assert_eq!(g.completion_tokens, 48);
    }
}

#[tokio::test]
async fn deterministic_for_a_seed() {
    let _cpu = CPU.read().await;
    let p = provider().await;
    let run = |sampling: Sampling| async move {
        p.generate(request(SPEC_PROMPT, sampling)).await.unwrap()
    };
    let a = run(greedy(24)).await;
    let b = run(greedy(24)).await;
    assert_eq!(a, b);

    let sampled = |seed| Sampling {
        temperature: 1.0,
        top_p: 0.95,
        seed,
        max_new_tokens: 24,
        ..Sampling::default()
    };
    let s1 = run(sampled(7)).await;
    let s2 = run(sampled(7)).await;
    assert_eq!(s1, s2);
    let mut others = Vec::new();
    for seed in [8, 9, 10] {
        others.push(run(sampled(seed)).await.text);
    }
    assert!(
        others.iter().any(|t| *t != s1.text),
        "three other seeds all gave {:?}",
        s1.text
    );
}

#[tokio::test]
async fn stops_at_end_of_turn_or_length() {
    let _cpu = CPU.read().await;
    let p = provider().await;
    let g = p
        .generate(GenerateRequest {
            system: "Answer with a single word.".into(),
            user: "What colour is the sky on a clear day?".into(),
            sampling: greedy(160),
            schema: None,
            allowed_numbers: None,
        })
        .await
        .unwrap();
    eprintln!("{g:?}");
    assert_eq!(g.finish_reason, "stop", "{g:?}");
    assert!(g.completion_tokens < 160);
    assert!(!g.text.trim().is_empty());
    assert!(!g.text.contains("<|im_end|>") && !g.text.contains("<|endoftext|>"));

    let g = p.generate(request(SPEC_PROMPT, greedy(3))).await.unwrap();
    assert_eq!(g.finish_reason, "length");
    assert_eq!(g.completion_tokens, 3);
    assert!(!g.text.is_empty());
}

#[tokio::test]
async fn rejects_a_prompt_beyond_the_context() {
    let _cpu = CPU.read().await;
    let p = provider().await;
    let long = "backpack ".repeat(9000);
    let e = p.generate(request(&long, greedy(16))).await.unwrap_err();
    assert!(matches!(e, LlmError::Rejected(_)), "{e:?}");
    assert!(e.to_string().contains("context"), "{e}");
    assert!(!e.is_retryable());
}

#[tokio::test]
async fn concurrent_requests_complete_and_errors_stay_local() {
    let _cpu = CPU.read().await;
    let p = provider().await;
    let prompts: [&'static str; 3] = [
        "Name one use for a backpack.",
        "Describe a coffee mug in five words.",
        "Give a title for a steel water bottle.",
    ];
    let mut tasks = Vec::new();
    for (i, user) in prompts.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            (i, p.generate(request(user, greedy(16))).await)
        }));
    }
    // A bad request in the middle of the queue.
    let bad = tokio::spawn(async move {
        p.generate(request(
            "Describe a mug.",
            Sampling {
                repeat_penalty: -1.0,
                ..greedy(16)
            },
        ))
        .await
    });
    let mut concurrent = vec![None; prompts.len()];
    for t in tasks {
        let (i, g) = t.await.unwrap();
        let g = g.unwrap();
        assert!(g.completion_tokens >= 1);
        concurrent[i] = Some(g);
    }
    assert!(matches!(bad.await.unwrap(), Err(LlmError::Rejected(_))));

    // The runner serialises them: each answer is what it is alone, and it still works.
    let again = p.generate(request(prompts[1], greedy(16))).await.unwrap();
    assert_eq!(Some(again), concurrent[1]);
    let shared: Arc<dyn Provider> = Arc::new(p.clone());
    assert!(shared
        .generate(request(prompts[0], greedy(4)))
        .await
        .is_ok());
}

#[tokio::test]
async fn a_second_provider_shares_the_loaded_model() {
    let _cpu = CPU.read().await;
    let p = provider().await;
    let ps = Settings::default().providers["local"].clone();
    let q = LocalProvider::load("other", &ps, &models_dir())
        .await
        .unwrap();
    assert_eq!(q.info().provider, "other");
    assert_eq!(q.load_time(), p.load_time(), "loaded twice");
}

/// The model's logits do not depend on how the prompt is split into forward passes, and
/// they agree with candle's own `quantized_llama` on the same file (the reference).
#[tokio::test]
async fn chunked_prefill_is_exact_and_agrees_with_candle() {
    let _cpu = CPU.write().await;
    let p = provider().await;
    let tok = Arc::new(p.tokenizer().clone());
    let prompt = p
        .prompt_ids("Be brief.", "Describe a red ceramic mug.")
        .unwrap();
    assert!(prompt.len() > 20);
    let model = our_model();
    let logits = |chunk: usize| {
        let mut e = Engine::new(model.clone(), tok.clone(), p.chat_template(), 4096);
        e.set_prefill_chunk(chunk);
        e.prefill(&prompt, 0).unwrap().to_vec()
    };
    let whole = logits(4096);
    for chunk in [16, 7, 1] {
        assert_eq!(whole, logits(chunk), "chunk {chunk}");
    }
    // Prefill from a position: the cache of a prefix plus the rest is the same as all of it.
    let mut e = Engine::new(model.clone(), tok.clone(), p.chat_template(), 4096);
    e.prefill(&prompt[..20], 0).unwrap();
    assert_eq!(e.prefill(&prompt[20..], 20).unwrap(), &whole[..]);
    // A prefill past the context, or from the wrong position, is an error, not a panic.
    e.clear_kv_cache();
    assert!(e.prefill(&vec![1; 4097], 0).is_err());
    assert!(e.prefill(&prompt, 5).is_err());

    // candle's implementation, one token per forward pass (so it too multiplies the Q4_1
    // weights with activations quantised to 8 bits, as llama.cpp does; it rounds the
    // activations' scales to f16, we keep f32, and sums in another order): the probabilities
    // agree closely and the top token is the same; a wrong mask, position or layout would
    // change them completely.
    let mut reference = baseline_model();
    let mut theirs = Vec::new();
    for (pos, &t) in prompt.iter().enumerate() {
        let input = candle_core::Tensor::new(&[t], &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        theirs = reference
            .forward(&input, pos)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
    }
    let diff = max_prob_diff(&whole, &theirs);
    println!("largest probability difference from candle: {diff}");
    assert!(diff < 0.05, "probabilities differ from candle's by {diff}");
    assert_eq!(argmax(&whole), argmax(&theirs));
}

/// Several generations decoded together (one forward pass per step for all of them) give
/// exactly the tokens each gives alone, on real prompts of two channels, constrained or not.
#[tokio::test]
async fn batched_decoding_gives_the_same_tokens() {
    use enricher::llm::local::runner::Generate;
    let _cpu = CPU.write().await;
    let p = provider().await;
    let tok = Arc::new(p.tokenizer().clone());
    let model = our_model();
    let mut reqs: Vec<GenerateRequest> = real_prompts("seo", 2)
        .into_iter()
        .chain(real_prompts("amazon", 2))
        .collect();
    // One of them under the channel's JSON constraint, with a longer answer.
    let channels =
        enricher::channel::Channels::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts"))
            .unwrap();
    reqs[1].schema = Some(channels.get("seo").unwrap().schema());
    reqs[1].sampling.max_new_tokens = 40;
    let never = || false;
    let mut plain = Engine::new(model.clone(), tok.clone(), p.chat_template(), 4096);
    plain.set_prefix_cache(false);
    let alone: Vec<_> = reqs
        .iter()
        .map(|r| plain.generate(r, &never).unwrap().0)
        .collect();

    let mut batched = Engine::new(model, tok, p.chat_template(), 4096);
    // Start them at different times, as requests arrive: two first, then the others.
    let mut seqs: Vec<_> = reqs[..2]
        .iter()
        .map(|r| batched.start(r).unwrap())
        .collect();
    for _ in 0..3 {
        let mut refs: Vec<_> = seqs.iter_mut().collect();
        batched.step(&mut refs).unwrap();
    }
    seqs.extend(reqs[2..].iter().map(|r| batched.start(r).unwrap()));
    while seqs.iter().any(|s| !batched.is_done(s)) {
        let mut refs: Vec<_> = seqs.iter_mut().collect();
        batched.step(&mut refs).unwrap();
    }
    let mut copied = Vec::new();
    for (i, (s, a)) in seqs.into_iter().zip(&alone).enumerate() {
        let (g, t) = batched.finish(s).unwrap();
        assert_eq!(g.text, a.text, "request {i}");
        assert_eq!(g.completion_tokens, a.completion_tokens, "request {i}");
        assert!(t.batch >= 2, "request {i} ran alone");
        copied.push(t.cached_prompt_tokens);
    }
    assert!(alone[1].text.starts_with('{'), "{}", alone[1].text);
    // The second request of each channel, started with the first, waited for it and copied
    // the channel's shared instructions from its cache instead of computing them again.
    assert_eq!(copied[0], 0, "{copied:?}");
    assert!(copied[1] >= 64 && copied[3] >= 64, "{copied:?}");
}

fn softmax(l: &[f32]) -> Vec<f32> {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = l.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
}

fn max_prob_diff(a: &[f32], b: &[f32]) -> f32 {
    softmax(a)
        .iter()
        .zip(&softmax(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Throughput on a ~300-token prompt and 64 new tokens; prints the figures.
/// `cargo test --test local_model -- --ignored --nocapture throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "benchmark: run explicitly"]
async fn throughput() {
    let _cpu = CPU.write().await;
    let p = provider().await;
    println!("load time: {:?}", p.load_time());
    let spec = "Write a product description for the following product. Use all the facts.\n\
        Product: Trailblazer 40L hiking backpack by Northpeak Outfitters\n\
        Material: 210D ripstop nylon with PU coating, YKK zippers, aluminium frame sheet\n\
        Weight: 1.2 kg; dimensions 62 x 32 x 24 cm; volume 40 litres\n\
        Features: detachable rain cover, padded hip belt with two zip pockets, hydration \
        sleeve for a 3 L bladder, trekking pole loops, ventilated back panel, top lid \
        pocket, side compression straps, front stretch pocket, sternum strap with whistle.\n\
        Colours: forest green, slate grey, sunset orange.\n\
        Warranty: 5 years. Care: hand wash with mild soap, air dry, do not tumble dry.\n\
        Audience: day hikers and weekend trekkers who want one bag for both.\n\
        Tone: friendly, concrete, no superlatives, no claims that are not in the facts.\n\
        Length: three short paragraphs, then a list of five bullet points. Mention the \
        warranty and the care instructions near the end, and keep every number exactly as given.";
    let req = request(
        spec,
        Sampling {
            max_new_tokens: 64,
            repeat_penalty: 1.0,
            temperature: 0.0,
            ..Sampling::default()
        },
    );
    let prompt = p.prompt_ids(&req.system, &req.user).unwrap();
    // Warm-up (first-use costs), then the measured runs, alternating with a plain candle loop
    // on the same prompt (the machine is shared: compare runs made side by side).
    p.generate_timed(req.clone()).await.unwrap();
    let mut baseline = baseline_model();
    let sampled = GenerateRequest {
        sampling: Sampling {
            max_new_tokens: 64,
            ..Sampling::default()
        },
        ..req.clone()
    };
    let short = GenerateRequest {
        system: String::new(),
        user: "Write a long story about a backpack.".into(),
        ..req.clone()
    };
    for _ in 0..3 {
        for (what, req) in [
            ("greedy", &req),
            ("default sampling", &sampled),
            ("greedy, short prompt", &short),
        ] {
            let (g, t) = p.generate_timed(req.clone()).await.unwrap();
            println!(
                "provider, {what}: prompt {} tokens: prefill {:?} = {:.1} tok/s; completion {} tokens ({}): decode {:?} = {:.1} tok/s (sampling {:?})",
                g.prompt_tokens,
                t.prefill,
                t.prompt_tokens_per_s(&g),
                g.completion_tokens,
                g.finish_reason,
                t.decode,
                t.completion_tokens_per_s(&g),
                t.sampling,
            );
        }
        let (pre, dec, n) =
            tokio::task::block_in_place(|| plain_candle_loop(&mut baseline, &prompt, 64));
        println!(
            "plain candle loop: prefill {pre:?} = {:.1} tok/s; decode {dec:?} = {:.1} tok/s ({n} tokens)",
            prompt.len() as f64 / pre.as_secs_f64(),
            (n - 1) as f64 / dec.as_secs_f64()
        );
    }
}

fn our_model() -> Arc<enricher::llm::local::model::Model> {
    let mut f = std::fs::File::open(model_file().path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    Arc::new(enricher::llm::local::model::Model::from_gguf(&ct, &mut f).unwrap())
}

fn baseline_model() -> candle_transformers::models::quantized_llama::ModelWeights {
    let path = model_file().path;
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        ct,
        &mut f,
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

/// candle-examples' loop: the whole prompt in one forward pass, then greedy steps with
/// `LogitsProcessor` (no stop token, `n` tokens).
fn plain_candle_loop(
    model: &mut candle_transformers::models::quantized_llama::ModelWeights,
    prompt: &[u32],
    n: usize,
) -> (std::time::Duration, std::time::Duration, usize) {
    use candle_core::{Device, Tensor};
    let mut lp = candle_transformers::generation::LogitsProcessor::new(0, None, None);
    let t0 = std::time::Instant::now();
    let input = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&input, 0).unwrap().squeeze(0).unwrap();
    let mut next = lp.sample(&logits).unwrap();
    let prefill = t0.elapsed();
    let t1 = std::time::Instant::now();
    for i in 0..n - 1 {
        let input = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model
            .forward(&input, prompt.len() + i)
            .unwrap()
            .squeeze(0)
            .unwrap();
        next = lp.sample(&logits).unwrap();
    }
    (prefill, t1.elapsed(), n)
}

/// The first `n` real products of the WDC dev set, rendered with a channel's prompt.
fn real_prompts(channel: &str, n: usize) -> Vec<GenerateRequest> {
    real_prompts_fixing(channel, n, &[])
}

/// [`real_prompts`] as repairs asking to fix `findings`.
fn real_prompts_fixing(channel: &str, n: usize, findings: &[String]) -> Vec<GenerateRequest> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = root.join("../shared/data/products/wdc-pave-dev.jsonl");
    let bytes = std::fs::read(&data).unwrap_or_else(|e| panic!("{}: {e}", data.display()));
    let channels = enricher::channel::Channels::load(&root.join("prompts")).unwrap();
    let prompts = enricher::prompt::Prompts::load(&root.join("prompts")).unwrap();
    let ch = channels.get(channel).unwrap();
    enricher::spec::parse_submission(&bytes, &Default::default())
        .into_iter()
        .filter_map(|(_, r)| r.ok())
        .take(n)
        .map(|spec| {
            let inputs = enricher::prompt::PromptInputs {
                feedback: None,
                findings,
            };
            let p = prompts.render(ch, &spec, &inputs).unwrap();
            GenerateRequest {
                system: p.system,
                user: p.user,
                sampling: greedy(20),
                schema: None,
                allowed_numbers: None,
            }
        })
        .collect()
}

/// Prompts that share the channel's instructions, or a repair that shares its first
/// attempt's prompt up to the end of the product data, reuse their KV cache, and the
/// answers are the same tokens as without the cache (greedy).
#[tokio::test]
async fn prefix_cache_gives_the_same_tokens() {
    use enricher::llm::local::runner::Generate;
    let _cpu = CPU.write().await;
    let p = provider().await;
    let tok = Arc::new(p.tokenizer().clone());
    let model = our_model();
    let mut cached = Engine::new(model.clone(), tok.clone(), p.chat_template(), 4096);
    let mut plain = Engine::new(model.clone(), tok.clone(), p.chat_template(), 4096);
    plain.set_prefix_cache(false);
    // Snapshots of learnt prefixes only, as when the remembered prompts have moved on.
    let mut snapshots = Engine::new(model, tok, p.chat_template(), 4096);
    snapshots.set_remembered_bytes(0);
    let never = || false;
    let findings = ["title: is 230 characters, at most 200 allowed".to_string()];
    let reqs: Vec<_> = real_prompts("seo", 3)
        .into_iter()
        .chain(real_prompts("amazon", 1))
        .chain(real_prompts_fixing("amazon", 1, &findings))
        .collect();
    let (mut reused, mut snapshot) = (Vec::new(), Vec::new());
    for (i, req) in reqs.iter().enumerate() {
        let (a, ta) = cached.generate(req, &never).unwrap();
        let (b, tb) = plain.generate(req, &never).unwrap();
        assert_eq!(a.text, b.text, "prompt {i}");
        assert_eq!(a.completion_tokens, b.completion_tokens, "prompt {i}");
        assert_eq!(tb.cached_prompt_tokens, 0);
        let (c, tc) = snapshots.generate(req, &never).unwrap();
        assert_eq!(c.text, b.text, "prompt {i} from snapshots");
        reused.push((ta.cached_prompt_tokens, a.prompt_tokens as usize));
        snapshot.push(tc.cached_prompt_tokens);
    }
    // seo: the first is plain; the second starts from the first's remembered cache (the
    // channel's instructions) and learns nothing new; the third likewise. amazon: another
    // system prompt, so nothing is shared; its repair reads only what follows the data.
    assert_eq!(reused[0].0, 0);
    for (cached_tokens, _) in &reused[1..3] {
        assert!(*cached_tokens >= 64, "{reused:?}");
    }
    assert_eq!(reused[3].0, 0);
    let (repair_cached, repair_len) = reused[4];
    assert!(repair_cached > reused[1].0 + 50, "{reused:?}");
    assert!(repair_len - repair_cached < 80, "{reused:?}");
    assert_eq!(plain.prefix_snapshots(), 0);
    // Snapshots only: the second seo prompt learns the shared prefix, the third reuses it.
    assert_eq!(snapshot[..2], [0, 0]);
    assert!(snapshot[2] >= 64, "{snapshot:?}");
    assert_eq!(snapshot[3..], [0, 0]);
    assert_eq!(
        snapshots.prefix_snapshots(),
        2,
        "seo's instructions, and amazon's prompt up to the end of the data (learnt by the repair)"
    );
    println!("prompt tokens from a cache (of all): {reused:?}; from snapshots: {snapshot:?}");
}
