//! End to end through the HTTP API: submit real products, follow the batch, review, export.

use std::time::Duration;

use serde_json::{json, Value};

use crate::{
    backend_tests,
    support::{fake_openai::FakeOpenAi, remote_provider, shared_lines, Backend, TestApp},
};

async fn app_with_remote(backend: Backend) -> (TestApp, FakeOpenAi) {
    let fake = FakeOpenAi::start().await;
    let base = fake.base_url();
    let app = TestApp::spawn(backend, |s| {
        s.providers.insert("remote".into(), remote_provider(&base));
        s.default_provider = "remote".into();
    })
    .await;
    (app, fake)
}

backend_tests!(
    real_products_flow_to_approved_content_and_export,
    edit_then_approve_keeps_both_and_new_versions_supersede,
    reject_needs_a_reason_and_stale_revisions_conflict,
);

async fn real_products_flow_to_approved_content_and_export(backend: Backend) {
    let (app, fake) = app_with_remote(backend).await;
    let jsonl = shared_lines("wdc-pave-dev.jsonl", 6);
    let receipt = app.submit_jsonl(&jsonl, "").await;
    assert_eq!(receipt["accepted"], 6);
    assert_eq!(receipt["tasks"], 18, "6 products x 3 channels");
    let batch_id = receipt["batch_id"].as_str().unwrap().to_string();
    let batch = app.wait_batch(&batch_id, Duration::from_secs(60)).await;
    assert_eq!(batch["tasks_by_status"]["succeeded"], 18, "{batch}");
    // every request asked for structured output and carried the key
    assert!(fake
        .requests()
        .iter()
        .all(|r| r["response_format"]["type"] == "json_schema"));
    assert!(fake
        .auth_headers()
        .iter()
        .all(|h| h.as_deref() == Some("Bearer sk-test-secret-key")));

    let drafts = app.drafts(&format!("batch={batch_id}&limit=100")).await;
    assert_eq!(drafts.len(), 18);
    // one request per model call (a draft failing its checks gets one repair prompt)
    let calls: u64 = drafts
        .iter()
        .map(|d| d["provenance"]["model_calls"].as_u64().unwrap())
        .sum();
    assert_eq!(fake.request_count() as u64, calls);
    for d in &drafts {
        let p = &d["provenance"];
        assert_eq!(p["provider"], "remote");
        assert_eq!(p["model"], "fake-model");
        assert_eq!(p["template_hash"].as_str().unwrap().len(), 64);
        assert!(p["prompt_tokens"].as_u64().unwrap() > 0);
        assert!(p["rules_version"]
            .as_str()
            .unwrap()
            .starts_with(d["channel"].as_str().unwrap()));
    }
    // one seo draft for the HP processor kit, reviewed and approved
    let seo = drafts
        .iter()
        .find(|d| d["channel"] == "seo" && d["product_id"] == "wdc-pave:2532501")
        .expect("seo draft of the first product");
    let id = seo["id"].as_str().unwrap();
    let (status, one) = app.get(&format!("/v1/drafts/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(one["spec"]["brand"], "HP", "the draft shows its spec");
    let fields = json!({"title": "HP Xeon E7-4850 2.00GHz 10-core Processor Kit", "meta_description": "HP processor option kit with an Intel Xeon E7-4850 at 2.00GHz, 10 cores, 24MB cache and 130W TDP for BL680c G7."});
    let (status, body) = app
        .post_json(
            &format!("/v1/drafts/{id}/approve"),
            &json!({"fields": fields}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["approved"]["version"], 1);

    let (status, content) = app.get("/v1/products/wdc-pave:2532501/content").await;
    assert_eq!(status, 200, "{content}");
    assert_eq!(content["content"][0]["fields"]["title"], fields["title"]);
    assert_eq!(content["content"][0]["approved_by"], "token:test-admin");

    let (status, jsonl) = app
        .get_text("/v1/export?status=approved&format=jsonl")
        .await;
    assert_eq!(status, 200);
    let lines: Vec<Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    for key in [
        "product_id",
        "channel",
        "status",
        "version",
        "fields",
        "provenance",
    ] {
        assert!(
            lines[0].get(key).is_some(),
            "export line lacks {key}: {}",
            lines[0]
        );
    }
    assert_eq!(lines[0]["status"], "approved");
    assert_eq!(lines[0]["version"], 1);

    // drafts of a status export too, and CSV spreads bullets over columns
    let (status, csv) = app
        .get_text(&format!(
            "/v1/export?status=pending_review&format=csv&batch={batch_id}&channel=amazon"
        ))
        .await;
    assert_eq!(status, 200);
    let header = csv.lines().next().unwrap();
    for col in ["product_id", "channel", "title", "bullets_1", "bullets_5"] {
        assert!(
            header.split(',').any(|c| c == col),
            "CSV header lacks {col}: {header}"
        );
    }
    let (status, body) = app.get("/v1/export?format=xml").await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["field"], "format");
}

async fn edit_then_approve_keeps_both_and_new_versions_supersede(backend: Backend) {
    let (app, _fake) = app_with_remote(backend).await;
    let r = app
        .submit_jsonl(&shared_lines("wdc-pave-dev.jsonl", 1), "seo")
        .await;
    let batch_id = r["batch_id"].as_str().unwrap().to_string();
    app.wait_batch(&batch_id, Duration::from_secs(30)).await;
    let d = app.drafts(&format!("batch={batch_id}")).await.remove(0);
    let id = d["id"].as_str().unwrap().to_string();
    let generated = d["fields"].clone();

    // save an edit first (not approved yet), then approve it
    let edited = json!({"title": "HP Xeon E7-4850 Processor Option Kit for BL680c G7", "meta_description": "Upgrade a BL680c G7 with the HP Xeon E7-4850 option kit: 10 cores at 2.00GHz, 24MB cache, 130W."});
    let (status, body) = app
        .put_json(
            &format!("/v1/drafts/{id}/fields"),
            &json!({"fields": edited}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["edited_fields"], edited);
    assert_eq!(body["fields"], generated, "the generated text is kept");
    let (status, body) = app
        .post_json(&format!("/v1/drafts/{id}/approve"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["approved"]["fields"], edited);
    assert_eq!(body["approved"]["generated_fields"], generated);
    assert_eq!(body["approved"]["version"], 1);

    // an edit that breaks the channel's rules is refused with the findings
    let r2 = app
        .submit_jsonl(&shared_lines("wdc-pave-dev.jsonl", 1), "seo")
        .await;
    let b2 = r2["batch_id"].as_str().unwrap().to_string();
    app.wait_batch(&b2, Duration::from_secs(30)).await;
    let d2 = app.drafts(&format!("batch={b2}")).await.remove(0);
    let id2 = d2["id"].as_str().unwrap().to_string();
    let (status, body) = app
        .post_json(
            &format!("/v1/drafts/{id2}/approve"),
            &json!({"fields": {"title": "HP", "meta_description": "short"}}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["details"]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["rule"] == "length.min"));

    // regenerate with feedback: a new draft linked to the old one, approved as version 2
    let (status, body) = app
        .post_json(
            &format!("/v1/drafts/{id2}/regenerate"),
            &json!({"feedback": "mention the server generation"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let task_id = body["task_id"].as_str().unwrap().to_string();
    let new_draft = loop {
        let ds = app.drafts(&format!("batch={b2}")).await;
        if let Some(n) = ds.iter().find(|x| x["parent_draft_id"] == id2.as_str()) {
            break n.clone();
        }
        let (_, t) = app.get(&format!("/v1/tasks/{task_id}")).await;
        assert_ne!(t["status"], "failed", "{t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        new_draft["provenance"]["feedback"],
        "mention the server generation"
    );
    let (_, old) = app.get(&format!("/v1/drafts/{id2}")).await;
    assert_eq!(old["status"], "changes_requested");
    let nid = new_draft["id"].as_str().unwrap();
    let (status, body) = app
        .post_json(
            &format!("/v1/drafts/{nid}/approve"),
            &json!({"fields": edited}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["approved"]["version"], 2);
    let (_, hist) = app
        .get("/v1/products/wdc-pave:2532501/content?history=true")
        .await;
    let versions: Vec<(i64, bool)> = hist["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["version"].as_i64().unwrap(), c["superseded_at"].is_null()))
        .collect();
    assert_eq!(versions.len(), 2);
    assert!(
        versions.contains(&(1, false)),
        "version 1 superseded: {versions:?}"
    );
    assert!(
        versions.contains(&(2, true)),
        "version 2 current: {versions:?}"
    );
    let (_, current) = app.get("/v1/products/wdc-pave:2532501/content").await;
    assert_eq!(current["content"].as_array().unwrap().len(), 1);
    assert_eq!(current["content"][0]["version"], 2);
}

async fn reject_needs_a_reason_and_stale_revisions_conflict(backend: Backend) {
    let (app, _fake) = app_with_remote(backend).await;
    let r = app
        .submit_jsonl(&shared_lines("wdc-pave-dev.jsonl", 2), "amazon")
        .await;
    let batch_id = r["batch_id"].as_str().unwrap().to_string();
    app.wait_batch(&batch_id, Duration::from_secs(30)).await;
    let ds = app.drafts(&format!("batch={batch_id}")).await;
    let (a, b) = (ds[0]["id"].as_str().unwrap(), ds[1]["id"].as_str().unwrap());

    let (status, body) = app
        .post_json(&format!("/v1/drafts/{a}/reject"), &json!({"reason": "  "}))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "reason");
    let (status, body) = app
        .post_json(
            &format!("/v1/drafts/{a}/reject"),
            &json!({"reason": "tone is off"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "rejected");
    assert_eq!(body["reject_reason"], "tone is off");
    let (status, _) = app
        .post_json(&format!("/v1/drafts/{a}/approve"), &json!({}))
        .await;
    assert_eq!(status, 409, "a rejected draft cannot be approved");

    // two reviewers act on revision 0 of the same draft: the second gets 409
    let (status, _) = app
        .post_json(
            &format!("/v1/drafts/{b}/reject"),
            &json!({"reason": "first", "revision": 0}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = app
        .post_json(
            &format!("/v1/drafts/{b}/reject"),
            &json!({"reason": "second", "revision": 0}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let (_, after) = app.get(&format!("/v1/drafts/{b}")).await;
    assert_eq!(after["reject_reason"], "first", "nothing overwritten");

    let (status, body) = app.get("/v1/drafts/NOPE").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = app.get("/v1/drafts?status=ready").await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["field"], "status");
}

backend_tests!(bulk_approval_quality_history_and_audit);

async fn bulk_approval_quality_history_and_audit(backend: Backend) {
    let (app, fake) = app_with_remote(backend).await;
    // four products: two answered cleanly, two with copy that fails the checks
    let r = app
        .submit_jsonl(&shared_lines("wdc-pave-dev.jsonl", 4), "seo")
        .await;
    let batch = r["batch_id"].as_str().unwrap().to_string();
    app.wait_batch(&batch, Duration::from_secs(30)).await;
    let _ = fake;
    let drafts = app.drafts(&format!("batch={batch}")).await;
    assert_eq!(drafts.len(), 4);
    // make one draft carry a warning-free but edited state, and reject another
    let (a, b) = (
        drafts[0]["id"].as_str().unwrap(),
        drafts[1]["id"].as_str().unwrap(),
    );
    let (s, body) = app
        .post_json(
            &format!("/v1/drafts/{b}/reject"),
            &json!({"reason": "Too generic"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = app
        .post_json(
            &format!("/v1/drafts/{a}/comments"),
            &json!({"body": "Check the <b>cache</b> size"}),
        )
        .await;
    assert_eq!(s, 201, "{body}");

    let (s, out) = app
        .post_json("/v1/drafts/bulk-approve", &json!({"batch": batch}))
        .await;
    assert_eq!(s, 200, "{out}");
    let approved = out["approved"].as_array().unwrap();
    let skipped = out["skipped"].as_array().unwrap();
    let pending_clean = drafts
        .iter()
        .filter(|d| {
            d["id"] != b
                && d["status"] == "pending_review"
                && d["findings"].as_array().unwrap().is_empty()
        })
        .count();
    assert_eq!(approved.len(), pending_clean, "{out}");
    for s in skipped {
        assert!(!s["reason"].as_str().unwrap().is_empty());
    }
    for d in approved {
        assert_eq!(d["version"], 1);
    }
    let (s, body) = app.post_json("/v1/drafts/bulk-approve", &json!({})).await;
    assert_eq!(s, 422, "bulk approval needs a scope: {body}");

    // history: versions, diff, audit entries, comments
    let (s, h) = app.get(&format!("/v1/drafts/{a}/history")).await;
    assert_eq!(s, 200);
    assert_eq!(h["comments"][0]["body"], "Check the <b>cache</b> size");
    let actions: Vec<&str> = h["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"draft.comment"), "{actions:?}");
    let (_, hb) = app.get(&format!("/v1/drafts/{b}/history")).await;
    let rej = hb["audit"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "draft.reject")
        .unwrap();
    assert_eq!(rej["reason"], "Too generic");
    assert_eq!(rej["before"]["status"], "pending_review");
    assert_eq!(rej["after"]["status"], "rejected");
    assert_eq!(rej["actor"], "token:test-admin");

    // quality per channel and per template
    let (s, q) = app.get("/v1/quality").await;
    assert_eq!(s, 200);
    let seo = &q["by_channel"]["seo"];
    assert_eq!(seo["rejected"], 1);
    assert_eq!(seo["approved"].as_u64().unwrap() as usize, approved.len());
    assert_eq!(seo["reasons"][0][0], "too generic");
    assert!(q["by_template"]
        .as_object()
        .unwrap()
        .keys()
        .all(|k| k.starts_with("seo/")));

    // the audit log is exportable and append-only
    let (s, text) = app.get_text("/v1/audit?format=jsonl").await;
    assert_eq!(s, 200);
    assert!(text.lines().count() >= 2 + approved.len());
    let tampered = enricher::on_db!(app.db(), p => sqlx::query("update audit_log set actor = 'mallory'").execute(p).await.map(|_| ()));
    assert!(tampered.is_err(), "audit_log refuses updates");
    let deleted = enricher::on_db!(app.db(), p => sqlx::query("delete from audit_log").execute(p).await.map(|_| ()));
    assert!(deleted.is_err(), "audit_log refuses deletes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_prometheus_metrics() {
    let app = TestApp::spawn(Backend::Sqlite, |_| {}).await;
    let r = app
        .submit_jsonl(&shared_lines("wdc-pave-dev.jsonl", 2), "seo")
        .await;
    app.wait_batch(r["batch_id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    let plain = reqwest::Client::new();
    let h = plain
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status().as_u16(), 200);
    let ready: Value = plain
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["database"], true);
    let text = plain
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "enricher_attempts_total{outcome=\"succeeded\"}",
        "enricher_task_duration_seconds_bucket",
        "enricher_tokens_total{provider=\"stub\",direction=\"prompt\"}",
        "enricher_tasks{status=\"succeeded\"}",
        "enricher_drafts{status=",
        "enricher_queue_depth",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
}
