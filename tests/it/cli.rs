//! The CLI against a real SQLite file: submit (with in-process workers when none runs),
//! list drafts, approve, export.

use std::process::{Command, Output};

use crate::support::{enricher_bin, root, shared_data, Backend, TestDb};

fn run(db: &TestDb, args: &[&str]) -> Output {
    Command::new(enricher_bin())
        .args(args)
        .current_dir(db.dir.path())
        .env("DATABASE_URL", &db.url)
        .env("ENRICHER_DEFAULT_PROVIDER", "stub")
        .env("ENRICHER_PATHS__PROMPTS_DIR", root().join("prompts"))
        .env("ENRICHER_PATHS__MODELS_DIR", root().join("models"))
        .env("ENRICHER_WORKER__POLL_INTERVAL_MS", "50")
        .env_remove("RUST_LOG")
        .output()
        .expect("run enricher")
}

fn ok(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "stdout: {out}\nstderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_review_and_export_from_the_command_line() {
    let db = TestDb::new(Backend::Sqlite).await;
    let input = db.dir.path().join("in.jsonl");
    let lines: String = std::fs::read_to_string(shared_data("wdc-pave-dev.jsonl"))
        .unwrap()
        .lines()
        .take(3)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&input, format!("{lines}{{\"id\": \"bad\"}}\n")).unwrap();

    let o = run(
        &db,
        &[
            "submit",
            input.to_str().unwrap(),
            "--channels",
            "seo,amazon",
            "--json",
        ],
    );
    let out = ok(&o);
    let status: serde_json::Value = serde_json::from_str(&out).expect("json status");
    assert_eq!(status["done"], true);
    assert_eq!(status["tasks"], 6);
    assert_eq!(status["tasks_by_status"]["succeeded"], 6);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("refused: line 4: attributes"), "{stderr}");

    let out = ok(&run(&db, &["drafts", "list", "--channel", "seo", "--json"]));
    let drafts: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(drafts.len(), 3);
    let open = drafts
        .iter()
        .find(|d| d["status"] == "pending_review")
        .expect("a pending seo draft");
    let id = open["id"].as_str().unwrap();

    let out = ok(&run(&db, &["approve", id, "--by", "maria"]));
    assert!(out.contains("version 1"), "{out}");
    let out = ok(&run(
        &db,
        &["export", "--status", "approved", "--format", "jsonl"],
    ));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["draft_id"], id);
    assert_eq!(lines[0]["approved_by"], "cli:maria");
    assert_eq!(lines[0]["version"], 1);

    let o = run(
        &db,
        &["reject", drafts[1]["id"].as_str().unwrap(), "--reason", ""],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("reason"),
        "a reason is required"
    );

    let out = ok(&run(
        &db,
        &["export", "--status", "approved", "--format", "csv"],
    ));
    assert!(
        out.starts_with("product_id,channel,status,version,"),
        "{out}"
    );

    // nothing valid: a clear error and a failing exit code
    std::fs::write(&input, "not json\n").unwrap();
    let o = run(&db, &["submit", input.to_str().unwrap()]);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("line 1") && stderr.contains("malformed JSON"),
        "{stderr}"
    );
}
