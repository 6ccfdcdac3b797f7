//! Bad input fails alone, with an error naming the record, the field and the problem.

use std::time::Duration;

use serde_json::json;

use crate::support::{shared_lines, Backend, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_fail_alone_and_good_ones_complete() {
    let app = TestApp::spawn(Backend::Sqlite, |_| {}).await;
    let good = shared_lines("wdc-pave-dev.jsonl", 2);
    let mut body: Vec<u8> = Vec::new();
    let mut good_lines = good.lines();
    body.extend_from_slice(good_lines.next().unwrap().as_bytes());
    body.push(b'\n');
    body.extend_from_slice(b"{\"id\": \"broken\", \"attributes\": {\n"); // line 2: malformed JSON
    body.extend_from_slice(b"{\"brand\": \"X\", \"attributes\": {\"a\": \"b\"}}\n"); // line 3: no id
    body.extend_from_slice(b"{\"id\": \"empty\", \"attributes\": {}}\n"); // line 4: empty attributes
    let big = "x".repeat(5 * 1024 * 1024);
    body.extend_from_slice(
        json!({"id": "big", "attributes": {"a": "b"}, "description": big})
            .to_string()
            .as_bytes(),
    );
    body.push(b'\n'); // line 5: 5 MB description
    body.extend_from_slice(b"{\"id\": \"latin1\", \"attributes\": {\"Farbe\": \"gr\xfcn\"}}\n"); // line 6: not UTF-8
    body.extend_from_slice(good_lines.next().unwrap().as_bytes()); // line 7
    body.push(b'\n');

    let (status, r) = app
        .post_raw(
            "/v1/batches?channels=seo,amazon",
            "application/x-ndjson",
            body,
        )
        .await;
    assert_eq!(status, 202, "{r}");
    assert_eq!(r["accepted"], 2);
    assert_eq!(r["tasks"], 4);
    let rejected = r["rejected"].as_array().unwrap();
    let find = |line: u64| {
        rejected
            .iter()
            .find(|e| e["position"]["n"] == line)
            .unwrap_or_else(|| panic!("no error for line {line}: {rejected:?}"))
    };
    assert_eq!(find(2)["field"], "(record)");
    assert!(find(2)["message"]
        .as_str()
        .unwrap()
        .contains("malformed JSON"));
    assert_eq!(find(3)["field"], "id");
    assert_eq!(find(4)["field"], "attributes");
    assert_eq!(find(4)["product_id"], "empty");
    assert_eq!(find(5)["field"], "description");
    assert!(find(5)["message"].as_str().unwrap().contains("too long"));
    assert!(find(6)["message"].as_str().unwrap().contains("UTF-8"));
    assert_eq!(rejected.len(), 5);

    let batch_id = r["batch_id"].as_str().unwrap();
    let b = app.wait_batch(batch_id, Duration::from_secs(30)).await;
    assert_eq!(b["tasks_by_status"]["succeeded"], 4, "{b}");
    assert_eq!(b["input_errors"], 5);
    let (_, errs) = app.get(&format!("/v1/batches/{batch_id}/errors")).await;
    assert_eq!(errs["errors"].as_array().unwrap().len(), 5);
    assert_eq!(errs["errors"][0]["position"], "line 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_level_problems_are_clear_4xx() {
    let app = TestApp::spawn(Backend::Sqlite, |_| {}).await;
    let one = shared_lines("wdc-pave-dev.jsonl", 1);
    // unknown channel: the whole request is refused, naming it
    let (status, body) = app
        .post_raw(
            "/v1/batches?channels=seo,tiktok",
            "application/x-ndjson",
            one.clone().into_bytes(),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "channels");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tiktok"));
    // nothing valid
    let (status, body) = app
        .post_raw(
            "/v1/batches",
            "application/x-ndjson",
            b"{\"id\": 1}\nnot json\n".to_vec(),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"]["details"]["rejected"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // empty
    let (status, body) = app
        .post_raw("/v1/batches", "application/x-ndjson", b"  \n".to_vec())
        .await;
    assert_eq!(status, 422, "{body}");
    // duplicate ids in one submission: the second fails alone
    let dup = format!("{one}{one}");
    let (status, body) = app
        .post_raw(
            "/v1/batches?channels=seo",
            "application/x-ndjson",
            dup.into_bytes(),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 1);
    assert!(body["rejected"][0]["message"]
        .as_str()
        .unwrap()
        .contains("duplicate of line 1"));
    // a wrapper with a bad `products` type
    let (status, body) = app
        .post_json("/v1/batches", &json!({"products": {"id": "x"}}))
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["field"], "products");
    // unknown draft filter value
    let (status, _) = app.get("/v1/drafts?channel=nope").await;
    assert_eq!(status, 422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_submission_shape_is_accepted() {
    let app = TestApp::spawn(Backend::Sqlite, |_| {}).await;
    let spec = json!({"id": "shape-1", "brand": "Acme", "category": "Tools", "attributes": {"Product Type": "Hammer", "Weight": "500 g"}});
    // one object
    let (s, r) = app.post_json("/v1/batches?channels=seo", &spec).await;
    assert_eq!((s, r["accepted"].as_u64()), (202, Some(1)), "{r}");
    // an array
    let (s, r) = app
        .post_json(
            "/v1/batches?channels=seo",
            &json!([spec, {"id": "shape-2", "attributes": {"a": 1}}]),
        )
        .await;
    assert_eq!((s, r["accepted"].as_u64()), (202, Some(2)), "{r}");
    // a wrapper naming channels
    let (s, r) = app
        .post_json(
            "/v1/batches",
            &json!({"products": [spec], "channels": ["amazon", "social"]}),
        )
        .await;
    assert_eq!((s, r["tasks"].as_u64()), (202, Some(2)), "{r}");
    assert_eq!(r["channels"], json!(["amazon", "social"]));
    // a single product in a wrapper, all channels by default
    let (s, r) = app
        .post_json("/v1/batches", &json!({"product": spec}))
        .await;
    assert_eq!((s, r["tasks"].as_u64()), (202, Some(3)), "{r}");
    // a file upload
    let form = reqwest::multipart::Form::new()
        .text("channels", "seo")
        .part(
            "file",
            reqwest::multipart::Part::bytes(shared_lines("flipkart-dev.jsonl", 3).into_bytes())
                .file_name("flipkart.jsonl"),
        );
    let resp = app
        .http
        .post(format!("{}/v1/batches", app.base))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let r: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(r["accepted"], 3);
    let b = app
        .wait_batch(r["batch_id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(b["source"], "upload:flipkart.jsonl");
    assert_eq!(b["tasks_by_status"]["succeeded"], 3, "{b}");
}
