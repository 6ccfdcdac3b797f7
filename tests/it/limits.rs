//! Shared rate limits and token budgets.

use std::time::Duration;

use enricher::{
    config::RateLimit,
    startup::{self, App, RunOptions},
};
use serde_json::json;

use crate::{
    backend_tests,
    support::{
        fake_openai::FakeOpenAi, remote_provider, shared_lines, test_settings, Backend, TestApp,
    },
};

backend_tests!(a_batch_over_its_token_budget_pauses_and_resumes);

async fn a_batch_over_its_token_budget_pauses_and_resumes(backend: Backend) {
    let app = TestApp::spawn(backend, |s| s.worker.concurrency = 1).await;
    // the stub spends a few hundred tokens a task: a budget of 600 covers about two
    let jsonl = shared_lines("wdc-pave-dev.jsonl", 6);
    let (status, r) = app
        .post_raw(
            "/v1/batches?channels=seo&token_budget=600",
            "application/x-ndjson",
            jsonl.into_bytes(),
        )
        .await;
    assert_eq!(status, 202, "{r}");
    let batch = r["batch_id"].as_str().unwrap().to_string();
    // wait until the batch pauses: no task left running, some parked
    let start = std::time::Instant::now();
    let paused = loop {
        let (_, b) = app.get(&format!("/v1/batches/{batch}")).await;
        let running = b["tasks_by_status"]["running"].as_i64().unwrap_or(0);
        if b["paused_reason"].is_string() && running == 0 {
            break b;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never paused: {b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let done = paused["tasks_by_status"]["succeeded"].as_i64().unwrap_or(0);
    assert!(
        (1..6).contains(&done),
        "spent within the budget, then stopped: {paused}"
    );
    assert!(paused["tokens_used"].as_i64().unwrap() >= 600);
    assert!(paused["paused_reason"]
        .as_str()
        .unwrap()
        .contains("budget of 600"));
    assert_eq!(paused["done"], false);
    // parked tasks did not use up attempts and are not failed
    let (_, tasks) = app
        .get(&format!("/v1/batches/{batch}/tasks?status=queued"))
        .await;
    assert!(!tasks["tasks"].as_array().unwrap().is_empty());
    assert!(paused["tasks_by_status"]["failed"].is_null(), "{paused}");

    // raise the budget: the batch resumes and finishes
    let (status, body) = app
        .put_json(
            &format!("/v1/batches/{batch}/budget"),
            &json!({"token_budget": 1_000_000}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["resumed_tasks"].as_u64().unwrap() >= 1);
    let b = app.wait_batch(&batch, Duration::from_secs(30)).await;
    assert_eq!(b["tasks_by_status"]["succeeded"], 6, "{b}");
    assert!(b["paused_reason"].is_null());
    let (status, _) = app
        .put_json(
            &format!("/v1/batches/{batch}/budget"),
            &json!({"token_budget": -5}),
        )
        .await;
    assert_eq!(status, 422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_budget_parks_work_until_it_allows_more() {
    let app = TestApp::spawn(Backend::Sqlite, |s| {
        s.worker.concurrency = 1;
        s.budget.daily_tokens = Some(1);
    })
    .await;
    let r = app
        .submit_jsonl(&shared_lines("wdc-pave-dev.jsonl", 3), "seo")
        .await;
    let batch = r["batch_id"].as_str().unwrap().to_string();
    let start = std::time::Instant::now();
    loop {
        let (_, b) = app.get(&format!("/v1/batches/{batch}")).await;
        if b["paused_reason"]
            .as_str()
            .is_some_and(|r| r.contains("daily token budget"))
            && b["tasks_by_status"]["running"].is_null()
        {
            assert_eq!(
                b["tasks_by_status"]["succeeded"], 1,
                "one task spends the day's budget: {b}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never paused: {b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_across_workers_sharing_the_database() {
    let fake = FakeOpenAi::start().await;
    let base = fake.base_url();
    let limit = |s: &mut enricher::config::Settings| {
        let mut p = remote_provider(&base);
        p.rate_limit = RateLimit {
            requests_per_minute: Some(3),
            tokens_per_minute: None,
            window_s: Some(2),
        };
        s.providers.insert("remote".into(), p);
        s.default_provider = "remote".into();
        s.repair.max_prompts = 0;
    };
    let app = TestApp::spawn(Backend::Sqlite, limit).await;
    // a second service with its own workers on the same database file
    let mut s2 = test_settings(&app.db.url);
    limit(&mut s2);
    let app2 = App::init(s2).await.unwrap();
    let other = startup::start(
        &app2,
        RunOptions {
            http: None,
            workers: Some(app2.pipeline().await.unwrap()),
            worker_name: "second".into(),
            grace: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    let r = app
        .submit_jsonl(&shared_lines("wdc-pave-dev.jsonl", 9), "seo")
        .await;
    app.wait_batch(r["batch_id"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    other.shutdown().await.unwrap();
    let times = fake.request_times();
    assert_eq!(times.len(), 9);
    // the shared windows: never more than 3 requests in one, 9 in all
    let windows: Vec<(i64, i64)> = enricher::on_db!(app.db(), p => sqlx::query_as(
        "select window_start, requests from rate_windows where provider = 'remote' order by window_start"
    )
    .fetch_all(p)
    .await)
    .unwrap();
    assert!(windows.iter().all(|w| w.1 <= 3), "{windows:?}");
    assert_eq!(windows.iter().map(|w| w.1).sum::<i64>(), 9, "{windows:?}");
    assert!(windows.len() >= 3, "{windows:?}");
    // and the server saw them spread out: the 7th request is two windows after the first
    let span = *times.last().unwrap() - times[0];
    assert!(
        span >= Duration::from_millis(1900),
        "requests spread over {span:?}"
    );
}
