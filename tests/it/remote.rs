//! The `openai` provider against a fake OpenAI-compatible server: normal answers and every
//! failure the wire can produce, through the real queue (retries, backoff, attempt budget).

use std::time::Duration;

use crate::support::{
    enricher_bin,
    fake_openai::{FakeOpenAi, Reply},
    remote_provider, shared_lines, Backend, TestApp,
};

async fn setup(tweak: impl FnOnce(&mut enricher::config::Settings)) -> (TestApp, FakeOpenAi) {
    let fake = FakeOpenAi::start().await;
    let base = fake.base_url();
    let app = TestApp::spawn(Backend::Sqlite, |s| {
        s.providers.insert("remote".into(), remote_provider(&base));
        s.default_provider = "remote".into();
        tweak(s);
    })
    .await;
    (app, fake)
}

async fn one_task(app: &TestApp) -> (String, serde_json::Value) {
    let r = app
        .submit_jsonl(&shared_lines("wdc-pave-dev.jsonl", 1), "seo")
        .await;
    let id = r["batch_id"].as_str().unwrap().to_string();
    let b = app.wait_batch(&id, Duration::from_secs(60)).await;
    (id, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_with_retry_after_is_honoured() {
    let (app, fake) = setup(|_| {}).await;
    fake.script([Reply::Status {
        code: 429,
        retry_after: Some("2".into()),
        body: r#"{"error":{"message":"slow down","type":"rate_limit_error","param":null,"code":null}}"#.into(),
    }]);
    let (_, b) = one_task(&app).await;
    assert_eq!(b["tasks_by_status"]["succeeded"], 1, "{b}");
    let t = fake.request_times();
    assert_eq!(t.len(), 2);
    assert!(
        t[1] - t[0] >= Duration::from_millis(1900),
        "waited {:?}, server asked for 2s",
        t[1] - t[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_with_a_non_json_body_is_retried_not_a_crash() {
    let (app, fake) = setup(|_| {}).await;
    fake.script([Reply::Status {
        code: 429,
        retry_after: None,
        body: "<html>Too Many Requests</html>".into(),
    }]);
    let (_, b) = one_task(&app).await;
    assert_eq!(b["tasks_by_status"]["succeeded"], 1, "{b}");
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_timeouts_and_malformed_json_are_retried() {
    let (app, fake) = setup(|_| {}).await;
    fake.script([
        Reply::Status {
            code: 500,
            retry_after: None,
            body: "internal".into(),
        },
        Reply::Hang(Duration::from_secs(4)), // client timeout is 2 s
        Reply::Malformed,
        Reply::Status {
            code: 503,
            retry_after: None,
            body: "{\"error\": {\"message\": \"overloaded\"}}".into(),
        },
    ]);
    let (batch_id, b) = one_task(&app).await;
    assert_eq!(b["tasks_by_status"]["succeeded"], 1, "{b}");
    assert_eq!(fake.request_count(), 5, "4 failures, then success");
    // the task records the attempts it needed (each attempt retries the call twice inline)
    let (_, tasks) = app.get(&format!("/v1/batches/{batch_id}/tasks")).await;
    let t = &tasks["tasks"][0];
    assert_eq!(t["status"], "succeeded");
    assert!(t["attempts"].as_i64().unwrap() >= 2, "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_json_schema_support_gets_json_object() {
    let (app, fake) = json_schema_refused_then_json_object(Reply::RefuseJsonSchema).await;
    // later requests go straight to what the server accepts
    let r = app
        .submit_jsonl(&shared_lines("wdc-pave-dev.jsonl", 1), "amazon")
        .await;
    app.wait_batch(r["batch_id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(
        fake.requests().last().unwrap()["response_format"]["type"],
        "json_object"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_validation_error_about_response_format_steps_down_too() {
    // llama-cpp-python's server answers `json_schema` with a 500 naming response_format.
    let (_, fake) = json_schema_refused_then_json_object(Reply::RefuseJsonSchemaWith500).await;
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2, "one refused call, one answered: {reqs:?}");
}

/// One task against a server that refuses `json_schema` with `reply`: the task succeeds,
/// the first call asked for `json_schema`, the second for `json_object`.
async fn json_schema_refused_then_json_object(reply: Reply) -> (TestApp, FakeOpenAi) {
    let (app, fake) = setup(|_| {}).await;
    fake.set_default(reply);
    let (_, b) = one_task(&app).await;
    assert_eq!(b["tasks_by_status"]["succeeded"], 1, "{b}");
    let reqs = fake.requests();
    assert_eq!(reqs[0]["response_format"]["type"], "json_schema");
    assert_eq!(reqs[1]["response_format"]["type"], "json_object");
    (app, fake)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prose_around_the_json_is_tolerated() {
    let (app, fake) = setup(|_| {}).await;
    fake.set_default(Reply::Content(
        "Sure! Here is the copy:\n```json\n{\"title\": \"HP Xeon E7-4850 Processor Option Kit, 10-core\", \"meta_description\": \"HP Intel Xeon E7-4850 processor option kit for BL680c G7 with 10 cores, 24MB cache and 130W TDP.\"}\n```".into(),
    ));
    let (batch_id, _) = one_task(&app).await;
    let d = app.drafts(&format!("batch={batch_id}")).await.remove(0);
    assert_eq!(
        d["fields"]["title"],
        "HP Xeon E7-4850 Processor Option Kit, 10-core"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_exhausts_its_attempts_is_failed_with_the_last_error() {
    let (app, fake) = setup(|s| {
        s.worker.max_attempts = 2;
        if let Some(p) = s.providers.get_mut("remote") {
            p.max_retries = 1;
        }
    })
    .await;
    fake.set_default(Reply::Status {
        code: 502,
        retry_after: None,
        body: "bad gateway from upstream".into(),
    });
    let (batch_id, b) = one_task(&app).await;
    assert_eq!(b["tasks_by_status"]["failed"], 1, "{b}");
    assert_eq!(
        fake.request_count(),
        4,
        "2 attempts x (1 call + 1 inline retry), no more"
    );
    let (_, tasks) = app
        .get(&format!("/v1/batches/{batch_id}/tasks?status=failed"))
        .await;
    let t = &tasks["tasks"][0];
    let err = t["last_error"].as_str().unwrap();
    assert!(
        err.contains("502") && err.contains("gave up after 2 attempts"),
        "{err}"
    );
    assert!(app.drafts(&format!("batch={batch_id}")).await.is_empty());

    // the CLI shows it too
    let out = std::process::Command::new(enricher_bin())
        .args(["status", &batch_id])
        .env("DATABASE_URL", &app.db.url)
        .env(
            "ENRICHER_PATHS__PROMPTS_DIR",
            crate::support::root().join("prompts"),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("failed: wdc-pave:2532501 / seo") && stdout.contains("502"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_request_fails_at_once_without_retries() {
    let (app, fake) = setup(|_| {}).await;
    fake.set_default(Reply::Status {
        code: 401,
        retry_after: None,
        body: r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#.into(),
    });
    let (batch_id, b) = one_task(&app).await;
    assert_eq!(b["tasks_by_status"]["failed"], 1, "{b}");
    assert_eq!(fake.request_count(), 1, "a 401 is not retried");
    let (_, tasks) = app
        .get(&format!("/v1/batches/{batch_id}/tasks?status=failed"))
        .await;
    let err = tasks["tasks"][0]["last_error"].as_str().unwrap();
    assert!(err.contains("401"), "{err}");
    assert!(
        !err.contains("sk-test-secret-key"),
        "the key never shows: {err}"
    );
}
