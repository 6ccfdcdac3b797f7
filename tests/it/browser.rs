//! The review page in a real browser (headless Chromium through ChromeDriver): log in, open
//! the queue, edit a bullet while watching its counter, approve, reject another with a
//! reason — checking the database after each step — and hostile text stays text.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use enricher::{auth::Role, checks::FieldValue, review::DraftStatus, store};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::support::{
    fake_openai::{FakeOpenAi, Reply},
    remote_provider, shared_lines, Backend, TestApp,
};

struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_driver() -> Driver {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver must be installed (Debian packages chromium and chromium-driver; scripts/test installs them)");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Driver { child, port }
}

async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--no-first-run", "--disable-dev-shm-usage", "--disable-component-update",
                "--disable-sync", "--window-size=1400,1000",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    ClientBuilder::rustls()
        .expect("tls")
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("webdriver session")
}

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .unwrap()
}

async fn wait_url(c: &Client, part: &str) {
    let start = Instant::now();
    loop {
        let url = c.current_url().await.unwrap().to_string();
        if url.contains(part) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "url {url} never contained {part}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn rows_href(c: &Client, i: usize) -> Option<String> {
    let rows = c.find_all(Locator::Css("#queue tr.row")).await.unwrap();
    rows[i].attr("data-href").await.unwrap()
}

fn artifacts() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const HOSTILE: &str =
    "<script>window.__pwned=1</script>\"><img src=x onerror=\"window.__pwned=2\">";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reviewer_edits_approves_and_rejects_in_the_browser() {
    let fake = FakeOpenAi::start().await;
    let base = fake.base_url();
    let app = TestApp::spawn(Backend::Sqlite, |s| {
        s.providers.insert("remote".into(), remote_provider(&base));
        s.default_provider = "remote".into();
    })
    .await;
    // three real products for amazon, and one hostile spec whose model output is hostile too
    let r = app
        .submit_jsonl(&shared_lines("wdc-pave-dev.jsonl", 3), "amazon")
        .await;
    let batch = r["batch_id"].as_str().unwrap().to_string();
    app.wait_batch(&batch, Duration::from_secs(30)).await;
    fake.script([Reply::Content(
        json!({"title": format!("Kit {HOSTILE}"), "bullets": [HOSTILE, "Second point here", "Third point here", "Fourth point here", "Fifth point here"]}).to_string(),
    )]);
    let hostile = json!({"id": "xss-1", "brand": "Acme", "attributes": {"Note": HOSTILE, "Product Type": "Widget"}}).to_string();
    let r2 = app.submit_jsonl(&format!("{hostile}\n"), "amazon").await;
    app.wait_batch(r2["batch_id"].as_str().unwrap(), Duration::from_secs(30))
        .await;

    let token = app.token(&[Role::Reviewer]).await;
    let driver = start_driver().await;
    let profile = tempfile::tempdir().unwrap();
    let c = browser(&driver, profile.path()).await;

    // 1. log in
    c.goto(&format!("{}/ui/queue", app.base)).await.unwrap();
    wait_url(&c, "/ui/login").await;
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(&token)
        .await
        .unwrap();
    c.find(Locator::Id("login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_url(&c, "/ui/queue").await;

    // 2. the queue of this batch
    c.goto(&format!("{}/ui/queue?status=&batch={batch}", app.base))
        .await
        .unwrap();
    let rows = c.find_all(Locator::Css("#queue tr.row")).await.unwrap();
    assert_eq!(rows.len(), 3, "three amazon drafts in the batch");
    let counts = text_of(&c, "#counts").await;
    let total: u32 = counts
        .split_whitespace()
        .filter_map(|w| w.parse::<u32>().ok())
        .sum();
    assert_eq!(total, 3, "counts per status add up: {counts}");
    // the pending ones, navigated with the keyboard: j/k move the selection, Enter opens
    c.goto(&format!(
        "{}/ui/queue?status=pending_review&batch={batch}",
        app.base
    ))
    .await
    .unwrap();
    let pending = c
        .find_all(Locator::Css("#queue tr.row"))
        .await
        .unwrap()
        .len();
    assert!(
        pending >= 2,
        "at least two pending drafts to work on ({pending})"
    );
    let body = c.find(Locator::Css("body")).await.unwrap();
    body.send_keys("j").await.unwrap();
    let selected = c.find(Locator::Css("tr.row.selected")).await.unwrap();
    assert_eq!(
        selected.attr("data-href").await.unwrap(),
        rows_href(&c, 1).await
    );
    body.send_keys("k").await.unwrap();
    let selected = c.find(Locator::Css("tr.row.selected")).await.unwrap();
    assert_eq!(
        selected.attr("data-href").await.unwrap(),
        rows_href(&c, 0).await
    );
    c.find(Locator::Css("body"))
        .await
        .unwrap()
        .send_keys("\u{E007}")
        .await
        .unwrap(); // Enter
    wait_url(&c, "/ui/drafts/").await;
    let url = c.current_url().await.unwrap();
    let first_id = url.path().rsplit('/').next().unwrap().to_string();
    let before = store::drafts::get(app.db(), &first_id).await.unwrap();
    assert!(before.status.is_open());

    // 3. edit a bullet, watch the live counter
    c.find(Locator::Css("body"))
        .await
        .unwrap()
        .send_keys("e")
        .await
        .unwrap();
    let area = c.find(Locator::Id("edit-bullets-1")).await.unwrap();
    assert!(
        area.is_displayed().await.unwrap(),
        "the edit form opens with e"
    );
    area.clear().await.unwrap();
    area.send_keys(&"x".repeat(300)).await.unwrap();
    let counter = c.find(Locator::Id("count-bullets-1")).await.unwrap();
    assert_eq!(counter.text().await.unwrap(), "300/255");
    assert!(counter
        .attr("class")
        .await
        .unwrap()
        .unwrap_or_default()
        .contains("over"));
    area.clear().await.unwrap();
    let edited_bullet = "Made for busy servers in the data center";
    area.send_keys(edited_bullet).await.unwrap();
    assert_eq!(
        counter.text().await.unwrap(),
        format!("{}/255", edited_bullet.chars().count())
    );
    assert!(!counter
        .attr("class")
        .await
        .unwrap()
        .unwrap_or_default()
        .contains("over"));
    std::fs::write(
        artifacts().join("draft-edit.png"),
        c.screenshot().await.unwrap(),
    )
    .unwrap();

    // 4. approve the edited copy; the database has the approval and both texts
    c.find(Locator::Id("approve-edited"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let start = Instant::now();
    let after = loop {
        let d = store::drafts::get(app.db(), &first_id).await.unwrap();
        if d.status == DraftStatus::Approved {
            break d;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not approved: {:?}",
            d.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let Some(FieldValue::List(items)) = after
        .edited_fields
        .as_ref()
        .and_then(|f| f.get("bullets"))
        .cloned()
    else {
        panic!("edited bullets stored: {:?}", after.edited_fields)
    };
    assert_eq!(items[1], edited_bullet);
    assert_eq!(after.fields, before.fields, "generated text kept");
    assert_eq!(after.reviewed_by.as_deref(), Some("token:test"));
    let versions = store::approved::list(
        app.db(),
        &store::approved::ApprovedFilter {
            product_id: Some(after.product_id.clone()),
            limit: 10,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(versions.len(), 1);

    // 5. the page moved on to the next open draft: reject it with a reason
    wait_url(&c, "msg=").await;
    let flash = text_of(&c, "#flash").await;
    assert!(flash.contains("Approved"), "{flash}");
    let url = c.current_url().await.unwrap();
    let second_id = url.path().rsplit('/').next().unwrap().to_string();
    assert_ne!(second_id, first_id);
    c.find(Locator::Css("body"))
        .await
        .unwrap()
        .send_keys("r")
        .await
        .unwrap();
    let active = c.active_element().await.unwrap();
    assert_eq!(
        active.attr("id").await.unwrap().as_deref(),
        Some("reason"),
        "r focuses the reason"
    );
    active.send_keys("Bullets repeat the title").await.unwrap();
    c.find(Locator::Id("reject"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        let d = store::drafts::get(app.db(), &second_id).await.unwrap();
        if d.status == DraftStatus::Rejected {
            assert_eq!(d.reject_reason.as_deref(), Some("Bullets repeat the title"));
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "not rejected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let audit = store::audit::for_entity(app.db(), "draft", &second_id)
        .await
        .unwrap();
    assert_eq!(audit.last().unwrap().action, "draft.reject");

    // 6. hostile spec and model text render as text, never as markup
    let xss = store::drafts::list(
        app.db(),
        &store::drafts::DraftFilter {
            product_id: Some("xss-1".into()),
            limit: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let xss_id = &xss[0].id;
    c.goto(&format!("{}/ui/drafts/{xss_id}", app.base))
        .await
        .unwrap();
    std::fs::write(
        artifacts().join("draft-page.png"),
        c.screenshot().await.unwrap(),
    )
    .unwrap();
    let pwned = c
        .execute(
            "return window.__pwned === undefined ? null : window.__pwned;",
            vec![],
        )
        .await
        .unwrap();
    assert!(pwned.is_null(), "script ran: {pwned}");
    assert_eq!(
        c.find_all(Locator::Css("main img")).await.unwrap().len(),
        0,
        "no injected elements"
    );
    assert_eq!(
        c.find_all(Locator::Css("main script")).await.unwrap().len(),
        0
    );
    let spec = text_of(&c, "#spec").await;
    assert!(
        spec.contains("<script>window.__pwned=1</script>"),
        "spec text shown literally: {spec}"
    );
    let copy = text_of(&c, "#view").await;
    assert!(
        copy.contains("onerror="),
        "model text shown literally: {copy}"
    );

    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_forms_need_a_session_and_its_csrf_token() {
    let app = TestApp::spawn(Backend::Sqlite, |_| {}).await;
    let r = app
        .submit_jsonl(&shared_lines("wdc-pave-dev.jsonl", 1), "seo")
        .await;
    let batch = r["batch_id"].as_str().unwrap().to_string();
    app.wait_batch(&batch, Duration::from_secs(30)).await;
    let d = app.drafts(&format!("batch={batch}")).await.remove(0);
    let id = d["id"].as_str().unwrap();
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // no session: the page sends you to the login form, a post is refused
    let resp = plain
        .get(format!("{}/ui/queue", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 303);
    assert_eq!(resp.headers()["location"], "/ui/login");
    let resp = plain
        .post(format!("{}/ui/drafts/{id}/reject", app.base))
        .form(&[("reason", "x"), ("csrf", "x")])
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_redirection() || resp.status().as_u16() == 401,
        "{}",
        resp.status()
    );
    // a consumer token cannot log in to the review page
    let consumer = app.token(&[Role::Consumer]).await;
    let resp = plain
        .post(format!("{}/ui/login", app.base))
        .form(&[("token", consumer.as_str())])
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["location"]
        .to_str()
        .unwrap()
        .contains("err="));
    // a reviewer logs in; a post without the CSRF token is refused and changes nothing
    let reviewer = app.token(&[Role::Reviewer]).await;
    let resp = plain
        .post(format!("{}/ui/login", app.base))
        .form(&[("token", reviewer.as_str())])
        .send()
        .await
        .unwrap();
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let sid = cookie.split(';').next().unwrap().to_string();
    let resp = plain
        .post(format!("{}/ui/drafts/{id}/reject", app.base))
        .header("cookie", &sid)
        .form(&[("reason", "x"), ("csrf", "wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    // the API refuses a cookie-authenticated change without the CSRF header
    let resp = plain
        .post(format!("{}/v1/drafts/{id}/reject", app.base))
        .header("cookie", &sid)
        .json(&json!({"reason": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let d = store::drafts::get(app.db(), id).await.unwrap();
    assert!(d.status.is_open(), "nothing changed");
}
