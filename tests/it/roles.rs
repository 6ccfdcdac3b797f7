//! Every route x every role: a refused call is 403 (401 without a token) and changes
//! nothing; an allowed call gets past authorization.

use std::time::Duration;

use enricher::{auth::Role, on_db};
use serde_json::{json, Value};

use crate::{
    backend_tests,
    support::{shared_lines, Backend, TestApp},
};

/// (method, path, body, roles allowed besides admin)
fn routes(
    batch: &str,
    draft: &str,
    draft2: &str,
    product: &str,
    token_id: &str,
) -> Vec<(&'static str, String, Option<Value>, Vec<Role>)> {
    use Role::*;
    let read_batches = vec![Submitter, Reviewer];
    vec![
        (
            "POST",
            "/v1/batches?channels=seo".into(),
            Some(json!({"id": "matrix-1", "attributes": {"a": "b"}})),
            vec![Submitter],
        ),
        ("GET", "/v1/batches".into(), None, read_batches.clone()),
        (
            "GET",
            format!("/v1/batches/{batch}"),
            None,
            read_batches.clone(),
        ),
        (
            "GET",
            format!("/v1/batches/{batch}/tasks"),
            None,
            read_batches.clone(),
        ),
        (
            "GET",
            format!("/v1/batches/{batch}/errors"),
            None,
            read_batches.clone(),
        ),
        ("GET", "/v1/drafts".into(), None, vec![Reviewer]),
        ("GET", format!("/v1/drafts/{draft}"), None, vec![Reviewer]),
        (
            "GET",
            format!("/v1/drafts/{draft}/history"),
            None,
            vec![Reviewer],
        ),
        (
            "GET",
            format!("/v1/drafts/{draft}/comments"),
            None,
            vec![Reviewer],
        ),
        (
            "POST",
            format!("/v1/drafts/{draft}/comments"),
            Some(json!({"body": "looks good"})),
            vec![Reviewer],
        ),
        (
            "PUT",
            format!("/v1/drafts/{draft}/fields"),
            Some(json!({"fields": {"title": "x", "meta_description": "y"}})),
            vec![Reviewer],
        ),
        (
            "POST",
            format!("/v1/drafts/{draft}/reject"),
            Some(json!({"reason": "no"})),
            vec![Reviewer],
        ),
        (
            "POST",
            format!("/v1/drafts/{draft2}/approve"),
            Some(json!({})),
            vec![Reviewer],
        ),
        (
            "POST",
            format!("/v1/drafts/{draft2}/regenerate"),
            Some(json!({"feedback": "shorter"})),
            vec![Reviewer],
        ),
        (
            "POST",
            "/v1/drafts/bulk-approve".into(),
            Some(json!({"batch": batch})),
            vec![Reviewer],
        ),
        ("GET", "/v1/quality".into(), None, vec![Reviewer]),
        ("GET", "/v1/audit".into(), None, vec![]),
        (
            "GET",
            format!("/v1/products/{product}/content"),
            None,
            vec![Consumer, Reviewer],
        ),
        (
            "GET",
            "/v1/export?status=approved".into(),
            None,
            vec![Consumer, Reviewer],
        ),
        (
            "GET",
            "/v1/export?status=pending_review".into(),
            None,
            vec![Reviewer],
        ),
        (
            "PUT",
            format!("/v1/batches/{batch}/budget"),
            Some(json!({"token_budget": 100000})),
            vec![Submitter],
        ),
        ("GET", "/v1/feed".into(), None, vec![Consumer]),
        ("GET", "/v1/webhooks".into(), None, vec![]),
        (
            "POST",
            "/v1/webhooks".into(),
            Some(json!({"url": "http://127.0.0.1:9/hook"})),
            vec![],
        ),
        ("GET", "/v1/deliveries".into(), None, vec![]),
        (
            "POST",
            "/v1/deliveries/replay".into(),
            Some(json!({})),
            vec![],
        ),
        ("GET", "/v1/tokens".into(), None, vec![]),
        (
            "POST",
            "/v1/tokens".into(),
            Some(json!({"name": "new", "roles": ["consumer"]})),
            vec![],
        ),
        ("DELETE", format!("/v1/tokens/{token_id}"), None, vec![]),
    ]
}

/// Everything a call could change, except token bookkeeping (last use).
async fn snapshot(app: &TestApp) -> Value {
    let mut out = serde_json::Map::new();
    for (name, sql) in [
        ("batches", "select count(*) from batches"),
        ("tasks", "select count(*) from tasks"),
        ("drafts", "select count(*) from drafts"),
        (
            "drafts_open",
            "select count(*) from drafts where status in ('pending_review', 'needs_attention')",
        ),
        (
            "draft_revisions",
            "select cast(coalesce(sum(revision), 0) as bigint) from drafts",
        ),
        ("approved", "select count(*) from approved_content"),
        ("comments", "select count(*) from comments"),
        ("audit", "select count(*) from audit_log"),
        ("tokens", "select count(*) from api_tokens"),
        ("webhooks", "select count(*) from webhook_subscriptions"),
        (
            "budgets",
            "select count(*) from batches where token_budget is not null",
        ),
        (
            "revoked",
            "select count(*) from api_tokens where revoked_at is not null",
        ),
    ] {
        let n: i64 = on_db!(app.db(), p => sqlx::query_scalar(sql).fetch_one(p).await).unwrap();
        out.insert(name.into(), json!(n));
    }
    Value::Object(out)
}

backend_tests!(every_route_checks_every_role);

async fn every_route_checks_every_role(backend: Backend) {
    let app = TestApp::spawn(backend, |_| {}).await;
    let r = app
        .submit_jsonl(&shared_lines("wdc-pave-dev.jsonl", 2), "seo")
        .await;
    let batch = r["batch_id"].as_str().unwrap().to_string();
    app.wait_batch(&batch, Duration::from_secs(30)).await;
    let drafts = app.drafts(&format!("batch={batch}")).await;
    let (d1, d2) = (
        drafts[0]["id"].as_str().unwrap(),
        drafts[1]["id"].as_str().unwrap(),
    );
    let product = drafts[0]["product_id"].as_str().unwrap().to_string();
    let victim = enricher::auth::create_token(app.db(), "victim", &[Role::Consumer], "test")
        .await
        .unwrap();

    let tokens: Vec<(Role, String)> = vec![
        (Role::Submitter, app.token(&[Role::Submitter]).await),
        (Role::Reviewer, app.token(&[Role::Reviewer]).await),
        (Role::Consumer, app.token(&[Role::Consumer]).await),
    ];
    let table = routes(&batch, d1, d2, &product, &victim.id);

    // refused calls first: 401 without a token, 403 with the wrong role, nothing changes
    let before = snapshot(&app).await;
    for (method, path, body, allowed) in &table {
        let (status, resp) = app.call(method, path, None, body.as_ref()).await;
        assert_eq!(status, 401, "{method} {path} without a token: {resp}");
        let (status, _) = app
            .call(method, path, Some("enr_not_a_real_token"), body.as_ref())
            .await;
        assert_eq!(status, 401, "{method} {path} with an unknown token");
        for (role, token) in &tokens {
            if !allowed.contains(role) {
                let (status, resp) = app.call(method, path, Some(token), body.as_ref()).await;
                assert_eq!(status, 403, "{method} {path} as {role}: {resp}");
                assert_eq!(resp["error"]["code"], "forbidden");
            }
        }
    }
    assert_eq!(
        snapshot(&app).await,
        before,
        "refused calls changed nothing"
    );

    // allowed calls get through authorization (their own outcome may be 2xx or a 4xx)
    for (method, path, body, allowed) in &table {
        for (role, token) in &tokens {
            if allowed.contains(role) {
                let (status, resp) = app.call(method, path, Some(token), body.as_ref()).await;
                assert!(
                    status != 401 && status != 403,
                    "{method} {path} as {role}: {status} {resp}"
                );
            }
        }
    }
    // admins may do everything
    for (method, path, body, _) in &table {
        if *method == "GET" {
            let (status, resp) = app
                .call(method, path, Some(&app.admin_token), body.as_ref())
                .await;
            assert!(
                status != 401 && status != 403,
                "{method} {path} as admin: {status} {resp}"
            );
        }
    }
    // a revoked token is refused
    let (status, _) = app
        .call("GET", "/v1/drafts", Some(&tokens[1].1), None)
        .await;
    assert_eq!(status, 200);
    let id = enricher::store::tokens::list(app.db())
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.roles == vec![Role::Reviewer])
        .unwrap()
        .id;
    let (status, _) = app
        .call(
            "DELETE",
            &format!("/v1/tokens/{id}"),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (status, _) = app
        .call("GET", "/v1/drafts", Some(&tokens[1].1), None)
        .await;
    assert_eq!(status, 401);
    // tokens are stored hashed
    let stored: Vec<String> = on_db!(app.db(), p => sqlx::query_scalar("select token_hash from api_tokens").fetch_all(p).await).unwrap();
    for (_, t) in &tokens {
        assert!(!stored.contains(t), "a token is stored in clear");
    }
}
