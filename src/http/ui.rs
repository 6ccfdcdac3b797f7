//! The review page: server-rendered HTML (tera templates compiled into the binary, with
//! autoescaping on), a login form with a session cookie, CSRF tokens on every form post,
//! and a little plain JavaScript (counters, inline edit, keyboard shortcuts).
//!
//! All spec and model text reaches the page through tera's HTML escaping; the templates
//! never mark such text `safe`.

use std::sync::LazyLock;

use axum::{
    extract::{FromRequestParts, Path, Query, State},
    http::{header, request::Parts, HeaderMap},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
    Form, Router,
};
use serde::{Deserialize, Serialize};

use super::{
    auth::{ct_eq, Authed, Via, SESSION_COOKIE},
    ApiError, AppState,
};
use crate::{
    auth::{self, Caller, Role},
    channel::{Channel, FieldDefKind},
    checks::{FieldValue, Fields, Finding, Severity},
    review::{self, Actor, DraftStatus, ReviewError},
    spec::ProductSpec,
    store::{self, drafts::DraftFilter},
};

/// Session lifetime.
const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;

static TEMPLATES: LazyLock<Result<tera::Tera, String>> = LazyLock::new(|| {
    let mut t = tera::Tera::new();
    // `.html` templates are autoescaped (tera's default); set it explicitly anyway.
    t.autoescape_on(vec![".html"]);
    t.add_raw_templates(vec![
        ("base.html", include_str!("../../templates/ui/base.html")),
        ("login.html", include_str!("../../templates/ui/login.html")),
        ("queue.html", include_str!("../../templates/ui/queue.html")),
        ("draft.html", include_str!("../../templates/ui/draft.html")),
        (
            "quality.html",
            include_str!("../../templates/ui/quality.html"),
        ),
    ])
    .map_err(|e| e.to_string())?;
    Ok(t)
});

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/queue") }))
        .route("/ui/", get(|| async { Redirect::to("/ui/queue") }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/queue", get(queue))
        .route("/ui/quality", get(quality))
        .route("/ui/bulk-approve", post(bulk_approve))
        .route("/ui/drafts/{id}", get(draft_page))
        .route("/ui/drafts/{id}/approve", post(approve))
        .route("/ui/drafts/{id}/edit", post(save_edit))
        .route("/ui/drafts/{id}/reject", post(reject))
        .route("/ui/drafts/{id}/regenerate", post(regenerate))
        .route("/ui/drafts/{id}/comment", post(comment))
        .route("/ui/static/app.js", get(app_js))
        .route("/ui/static/app.css", get(app_css))
}

async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../templates/ui/app.js"),
    )
        .into_response()
}

async fn app_css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../../templates/ui/app.css"),
    )
        .into_response()
}

fn render(name: &str, ctx: &tera::Context) -> Response {
    let html = match TEMPLATES.as_ref() {
        Ok(t) => t.render(name, ctx).map_err(|e| e.to_string()),
        Err(e) => Err(e.clone()),
    };
    match html {
        Ok(h) => (
            [
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'self'; frame-ancestors 'none'",
                ),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            Html(h),
        )
            .into_response(),
        Err(e) => ApiError::Internal(format!("rendering {name}: {e}")).into_response(),
    }
}

/// A logged-in reviewer on the page. Anything else is sent to the login form.
struct Reviewer {
    caller: Caller,
    csrf: String,
    id_hash: String,
}

impl FromRequestParts<AppState> for Reviewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        match Authed::from_request_parts(parts, state).await {
            Ok(Authed {
                caller,
                via: Via::Session { csrf, id_hash },
            }) => {
                if !caller.has(Role::Reviewer) {
                    return Err(ApiError::Forbidden.into_response());
                }
                Ok(Reviewer {
                    caller,
                    csrf,
                    id_hash,
                })
            }
            // The page works with its session; a bearer token alone is an API client.
            Ok(Authed { caller, .. }) => {
                if caller.has(Role::Reviewer) {
                    Err(Redirect::to("/ui/login").into_response())
                } else {
                    Err(ApiError::Forbidden.into_response())
                }
            }
            Err(ApiError::Unauthorized) => Err(Redirect::to("/ui/login").into_response()),
            Err(e) => Err(e.into_response()),
        }
    }
}

impl Reviewer {
    #[allow(clippy::result_large_err)] // the rejection is the response itself
    fn check_csrf(&self, sent: &str) -> Result<(), Response> {
        if ct_eq(sent, &self.csrf) {
            Ok(())
        } else {
            Err(ApiError::Forbidden.into_response())
        }
    }

    fn base_context(&self) -> tera::Context {
        let mut ctx = tera::Context::new();
        ctx.insert("user", &self.caller.name);
        ctx.insert("csrf", &self.csrf);
        ctx
    }
}

#[derive(Debug, Deserialize, Default)]
struct PageQuery {
    err: Option<String>,
}

async fn login_page(Query(q): Query<PageQuery>) -> Response {
    let mut ctx = tera::Context::new();
    ctx.insert("error", &q.err);
    render("login.html", &ctx)
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
}

fn is_loopback_host(headers: &HeaderMap) -> bool {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    matches!(name, "localhost" | "127.0.0.1" | "[::1]")
}

async fn login(
    State(s): State<AppState>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let caller = match auth::authenticate(&s.db, &f.token).await {
        Ok(c) => c,
        Err(auth::AuthError::Store(e)) => return ApiError::from(e).into_response(),
        Err(_) => {
            return Redirect::to("/ui/login?err=That+token+is+not+valid+(or+was+revoked).")
                .into_response()
        }
    };
    if !caller.has(Role::Reviewer) {
        return Redirect::to("/ui/login?err=That+token+has+no+reviewer+role.").into_response();
    }
    let sid = auth::random_secret("", 43);
    let csrf = auth::random_secret("", 32);
    if let Err(e) = store::tokens::create_session(
        &s.db,
        &auth::hash_secret(&sid),
        &caller.token_id,
        &csrf,
        SESSION_TTL_MS,
    )
    .await
    {
        return ApiError::from(e).into_response();
    }
    // Secure everywhere but plain-HTTP loopback, where browsers would drop it.
    let secure = if is_loopback_host(&headers) {
        ""
    } else {
        "; Secure"
    };
    let cookie = format!(
        "{SESSION_COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_TTL_MS / 1000
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/ui/queue")).into_response()
}

async fn logout(State(s): State<AppState>, PageForm(r, _): PageForm) -> Response {
    let _ = store::tokens::delete_session(&s.db, &r.id_hash).await;
    let cookie = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/ui/login")).into_response()
}

#[derive(Debug, Deserialize, Default, Serialize, Clone)]
struct QueueQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    batch: Option<String>,
    #[serde(default)]
    has_findings: Option<String>,
    #[serde(default, skip_serializing)]
    after: Option<String>,
    #[serde(default, skip_serializing)]
    msg: Option<String>,
    #[serde(default, skip_serializing)]
    err: Option<String>,
}

impl QueueQuery {
    /// The queue filter as a query string (to come back to the same queue).
    fn back(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("status", &self.status),
            ("channel", &self.channel),
            ("batch", &self.batch),
            ("has_findings", &self.has_findings),
        ] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                parts.push(format!("{k}={}", urlencode(v)));
            }
        }
        parts.join("&")
    }

    fn filter(&self, limit: i64) -> Result<DraftFilter, String> {
        let none_if_empty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        let status = match none_if_empty(&self.status) {
            None => None,
            Some(s) => Some(DraftStatus::parse(&s).ok_or_else(|| format!("unknown status {s}"))?),
        };
        Ok(DraftFilter {
            status,
            channel: none_if_empty(&self.channel),
            batch_id: none_if_empty(&self.batch),
            product_id: None,
            has_findings: match self.has_findings.as_deref() {
                Some("true") => Some(true),
                Some("false") => Some(false),
                _ => None,
            },
            after: none_if_empty(&self.after),
            limit,
        })
    }

    fn parse(qs: &str) -> QueueQuery {
        serde_urlencoded::from_str(qs).unwrap_or_default()
    }
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("x", s)])
        .map(|e| e.trim_start_matches("x=").to_string())
        .unwrap_or_default()
}

#[derive(Serialize)]
struct QueueRow {
    id: String,
    product_id: String,
    channel: String,
    status: String,
    headline: String,
    errors: usize,
    warnings: usize,
}

fn headline(f: &Fields) -> String {
    let t = f
        .get("title")
        .or_else(|| f.get("post"))
        .or_else(|| f.values().next())
        .map(FieldValue::joined)
        .unwrap_or_default();
    let mut out: String = t.chars().take(120).collect();
    if t.chars().count() > 120 {
        out.push('…');
    }
    out
}

async fn queue(
    State(s): State<AppState>,
    r: Reviewer,
    Query(mut q): Query<QueueQuery>,
) -> Response {
    if q.status.is_none() {
        q.status = Some("pending_review".into());
    }
    let filter = match q.filter(50) {
        Ok(f) => f,
        Err(e) => return ApiError::unprocessable("status", e).into_response(),
    };
    let drafts = match store::drafts::list(&s.db, &filter).await {
        Ok(d) => d,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let counts = store::drafts::count_by_status(&s.db, &filter)
        .await
        .unwrap_or_default();
    let rows: Vec<QueueRow> = drafts
        .iter()
        .map(|d| QueueRow {
            id: d.id.clone(),
            product_id: d.product_id.clone(),
            channel: d.channel.clone(),
            status: d.status.to_string(),
            headline: headline(d.current_fields()),
            errors: d
                .findings
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .count(),
            warnings: d
                .findings
                .iter()
                .filter(|f| f.severity == Severity::Warning)
                .count(),
        })
        .collect();
    let mut ctx = r.base_context();
    ctx.insert("drafts", &rows);
    ctx.insert("counts", &counts);
    ctx.insert("statuses", &DraftStatus::ALL.map(|s| s.as_str()));
    ctx.insert("channels", &s.channels.names().collect::<Vec<_>>());
    ctx.insert(
        "filter",
        &serde_json::json!({
            "status": q.status.clone().unwrap_or_default(),
            "channel": q.channel.clone().unwrap_or_default(),
            "batch": q.batch.clone().unwrap_or_default(),
            "has_findings": q.has_findings.clone().unwrap_or_default(),
        }),
    );
    ctx.insert("back", &q.back());
    ctx.insert(
        "next_after",
        &(drafts.len() == 50)
            .then(|| drafts.last().map(|d| d.id.clone()))
            .flatten(),
    );
    ctx.insert("message", &q.msg);
    ctx.insert("error", &q.err);
    render("queue.html", &ctx)
}

async fn quality(State(s): State<AppState>, r: Reviewer) -> Response {
    let report = match review::quality(&s.db).await {
        Ok(q) => q,
        Err(e) => return review_error(e),
    };
    let mut groups = Vec::new();
    for (prefix, map) in [
        ("channel", &report.by_channel),
        ("template", &report.by_template),
    ] {
        for (k, v) in map {
            groups.push(serde_json::json!({
                "name": format!("{prefix} {k}"),
                "s": v,
                "rate": format!("{:.0}%", v.acceptance_rate * 100.0),
                "dist": format!("{:.1}", v.mean_edit_distance),
            }));
        }
    }
    let mut ctx = r.base_context();
    ctx.insert("groups", &groups);
    render("quality.html", &ctx)
}

/// One piece of a field's text: plain, a finding's span, or a claim linked to the spec.
#[derive(Serialize, Debug, PartialEq)]
struct Segment {
    text: String,
    kind: &'static str,
    severity: &'static str,
    title: String,
    anchor: String,
}

#[derive(Serialize)]
struct ItemView {
    index: usize,
    text: String,
    chars: usize,
    over: bool,
    input_name: String,
    segments: Vec<Segment>,
}

#[derive(Serialize)]
struct FieldView {
    name: String,
    kind: &'static str,
    max: Option<usize>,
    min: Option<usize>,
    items: Vec<ItemView>,
}

#[derive(Serialize)]
struct FindingView {
    rule: String,
    field: String,
    item_label: Option<String>,
    severity: &'static str,
    message: String,
}

fn severity(s: Severity) -> &'static str {
    match s {
        Severity::Error => "error",
        Severity::Warning => "warning",
    }
}

/// Spans to highlight in one text: findings first, then claims (numbers and part numbers
/// linked to the spec attribute that contains them). Overlaps keep the earlier span.
fn segments(text: &str, findings: &[&Finding], spec: &ProductSpec) -> Vec<Segment> {
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len();
    let mut marks: Vec<(usize, usize, Segment)> = Vec::new();
    for f in findings {
        if let Some((a, b)) = f.span {
            let (a, b) = (a.min(n), b.min(n));
            if a < b {
                marks.push((
                    a,
                    b,
                    Segment {
                        text: String::new(),
                        kind: "finding",
                        severity: severity(f.severity),
                        title: format!("{}: {}", f.rule, f.message),
                        anchor: String::new(),
                    },
                ));
            }
        }
    }
    for (a, b, anchor, title) in claim_links(&chars, spec) {
        marks.push((
            a,
            b,
            Segment {
                text: String::new(),
                kind: "claim",
                severity: "",
                title,
                anchor,
            },
        ));
    }
    marks.sort_by_key(|m| (m.0, m.1));
    let mut out = Vec::new();
    let mut pos = 0;
    for (a, b, mut seg) in marks {
        if a < pos {
            continue;
        }
        if a > pos {
            out.push(plain(&chars[pos..a]));
        }
        seg.text = chars[a..b].iter().collect();
        out.push(seg);
        pos = b;
    }
    if pos < n {
        out.push(plain(&chars[pos..]));
    }
    out
}

fn plain(c: &[char]) -> Segment {
    Segment {
        text: c.iter().collect(),
        kind: "text",
        severity: "",
        title: String::new(),
        anchor: String::new(),
    }
}

/// Tokens with digits (numbers with units, part numbers) and the spec attribute whose value
/// contains them: (start, end, anchor id, title).
fn claim_links(chars: &[char], spec: &ProductSpec) -> Vec<(usize, usize, String, String)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_alphanumeric() {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_alphanumeric() || matches!(chars[i], '.' | '-' | '/'))
        {
            i += 1;
        }
        let mut end = i;
        while end > start && matches!(chars[end - 1], '.' | '-' | '/') {
            end -= 1;
        }
        let token: String = chars[start..end].iter().collect();
        if !token.chars().any(|c| c.is_ascii_digit()) {
            continue;
        }
        let needle = normalise(&token);
        for (idx, (name, value)) in spec.attributes.iter().enumerate() {
            if normalise(&value.display()).contains(&needle) {
                out.push((
                    start,
                    end,
                    format!("attr-{idx}"),
                    format!("from the spec: {name}"),
                ));
                break;
            }
        }
    }
    out
}

fn normalise(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric() || *c == '.')
        .flat_map(char::to_lowercase)
        .collect()
}

fn field_views(
    channel: &Channel,
    fields: &Fields,
    findings: &[Finding],
    spec: &ProductSpec,
) -> Vec<FieldView> {
    channel
        .fields
        .iter()
        .map(|def| {
            let rules = channel.rules.field(&def.name);
            let (max, min) = match def.kind {
                FieldDefKind::Text => (
                    rules.and_then(|r| r.max_chars),
                    rules.and_then(|r| r.min_chars),
                ),
                FieldDefKind::List => (
                    rules.and_then(|r| r.item_max_chars),
                    rules.and_then(|r| r.item_min_chars),
                ),
            };
            let texts: Vec<String> = match (def.kind, fields.get(&def.name)) {
                (FieldDefKind::Text, Some(v)) => vec![v.joined()],
                (FieldDefKind::List, Some(FieldValue::List(items))) => {
                    let (_, max_items) = def.item_range();
                    let mut v = items.clone();
                    // room to fill missing items when editing
                    while v.len() < max_items.min(v.len().max(def.item_range().0)) {
                        v.push(String::new());
                    }
                    v
                }
                (FieldDefKind::List, Some(FieldValue::Text(t))) => vec![t.clone()],
                (FieldDefKind::Text, None) => vec![String::new()],
                (FieldDefKind::List, None) => vec![String::new(); def.item_range().0.max(1)],
            };
            let items = texts
                .into_iter()
                .enumerate()
                .map(|(i, text)| {
                    let item = (def.kind == FieldDefKind::List).then_some(i);
                    let relevant: Vec<&Finding> = findings
                        .iter()
                        .filter(|f| f.field == def.name && f.item == item)
                        .collect();
                    let chars = text.chars().count();
                    ItemView {
                        index: i,
                        over: max.is_some_and(|m| chars > m),
                        chars,
                        input_name: match def.kind {
                            FieldDefKind::Text => format!("f.{}", def.name),
                            FieldDefKind::List => format!("f.{}.{i}", def.name),
                        },
                        segments: segments(&text, &relevant, spec),
                        text,
                    }
                })
                .collect();
            FieldView {
                name: def.name.clone(),
                kind: match def.kind {
                    FieldDefKind::Text => "text",
                    FieldDefKind::List => "list",
                },
                max,
                min,
                items,
            }
        })
        .collect()
}

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

async fn draft_page(
    State(s): State<AppState>,
    r: Reviewer,
    Path(id): Path<String>,
    Query(q): Query<QueueQuery>,
) -> Response {
    match draft_context(&s, &r, &id, &q).await {
        Ok(ctx) => render("draft.html", &ctx),
        Err(e) => e,
    }
}

async fn draft_context(
    s: &AppState,
    r: &Reviewer,
    id: &str,
    q: &QueueQuery,
) -> Result<tera::Context, Response> {
    let err = |e: store::StoreError| ApiError::from(e).into_response();
    let d = store::drafts::get(&s.db, id).await.map_err(err)?;
    let spec = store::tasks::spec_of(&s.db, &d.spec_id)
        .await
        .map_err(err)?;
    let channel = s
        .channels
        .get(&d.channel)
        .map_err(|e| ApiError::from(e).into_response())?;
    let fields = field_views(channel, d.current_fields(), &d.findings, &spec);
    let findings: Vec<FindingView> = d
        .findings
        .iter()
        .map(|f| FindingView {
            rule: f.rule.clone(),
            field: f.field.clone(),
            item_label: f.item.map(|i| format!("item {}", i + 1)),
            severity: severity(f.severity),
            message: f.message.clone(),
        })
        .collect();
    // neighbours in the same queue (by id order)
    let mut filter = q.filter(1).unwrap_or_default();
    filter.after = Some(d.id.clone());
    let next_id = store::drafts::list(&s.db, &filter)
        .await
        .ok()
        .and_then(|v| v.into_iter().next())
        .map(|x| x.id);
    let prev_id = store::drafts::previous(&s.db, &q.filter(1).unwrap_or_default(), &d.id)
        .await
        .ok()
        .flatten();
    let versions = store::approved::list(
        &s.db,
        &store::approved::ApprovedFilter {
            product_id: Some(d.product_id.clone()),
            channel: Some(d.channel.clone()),
            history: true,
            limit: 100,
            ..Default::default()
        },
    )
    .await
    .map_err(err)?;
    let audit = store::audit::for_entity(&s.db, "draft", &d.id)
        .await
        .map_err(err)?;
    let comments = store::comments::for_draft(&s.db, &d.id)
        .await
        .map_err(err)?;
    let diff: Vec<serde_json::Value> = review::diff_fields(&d.fields, d.current_fields())
        .into_iter()
        .filter(|(_, ops)| ops.iter().any(|o| o.op != "equal"))
        .map(|(field, ops)| serde_json::json!({"field": field, "ops": ops}))
        .collect();
    let mut ctx = r.base_context();
    ctx.insert(
        "draft",
        &serde_json::json!({
            "id": d.id, "status": d.status, "channel": d.channel, "product_id": d.product_id,
            "revision": d.revision, "reject_reason": d.reject_reason, "edited": d.edited_fields.is_some(),
        }),
    );
    ctx.insert(
        "spec",
        &serde_json::json!({
            "brand": spec.brand, "category": spec.category, "title": spec.title, "description": spec.description,
            "attributes": spec.attributes.iter().enumerate().map(|(i, (n, v))| serde_json::json!({
                "anchor": format!("attr-{i}"), "name": n, "value": v.display()
            })).collect::<Vec<_>>(),
        }),
    );
    ctx.insert("fields", &fields);
    ctx.insert("findings", &findings);
    ctx.insert("open", &d.status.is_open());
    ctx.insert("next_id", &next_id);
    ctx.insert("prev_id", &prev_id);
    ctx.insert("back", &q.back());
    ctx.insert(
        "versions",
        &versions
            .iter()
            .map(|v| serde_json::json!({
                "version": v.version, "approved_by": v.approved_by, "approved_at": time(v.approved_at),
                "superseded": v.superseded_at.is_some(), "this_draft": v.draft_id == d.id,
            }))
            .collect::<Vec<_>>(),
    );
    ctx.insert(
        "audit",
        &audit
            .iter()
            .map(|a| serde_json::json!({"at": time(a.at), "actor": a.actor, "action": a.action, "reason": a.reason}))
            .collect::<Vec<_>>(),
    );
    ctx.insert(
        "comments",
        &comments
            .iter()
            .map(|c| serde_json::json!({"at": time(c.created_at), "author": c.author, "body": c.body}))
            .collect::<Vec<_>>(),
    );
    ctx.insert("diff", &diff);
    ctx.insert("message", &q.msg);
    ctx.insert("error", &q.err);
    Ok(ctx)
}

/// A posted action form: csrf, revision, the queue to go back to, and `f.*` edit fields.
#[derive(Debug)]
struct ActionForm(Vec<(String, String)>);

/// A posted page form from a logged-in reviewer, its CSRF token checked.
struct PageForm(Reviewer, ActionForm);

impl axum::extract::FromRequest<AppState> for PageForm {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &AppState) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let r = Reviewer::from_request_parts(&mut parts, state).await?;
        let req = axum::extract::Request::from_parts(parts, body);
        let Form(pairs) = Form::<Vec<(String, String)>>::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let form = ActionForm(pairs);
        r.check_csrf(form.get("csrf").unwrap_or(""))?;
        Ok(PageForm(r, form))
    }
}

impl ActionForm {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    fn revision(&self) -> Option<i64> {
        self.get("revision").and_then(|r| r.parse().ok())
    }

    fn back(&self) -> QueueQuery {
        QueueQuery::parse(self.get("back").unwrap_or(""))
    }

    /// The edit, if the form carries `f.*` fields.
    fn fields(&self, channel: &Channel) -> Option<Fields> {
        if !self.0.iter().any(|(k, _)| k.starts_with("f.")) {
            return None;
        }
        let mut out = Fields::new();
        for def in &channel.fields {
            match def.kind {
                FieldDefKind::Text => {
                    let v = self.get(&format!("f.{}", def.name)).unwrap_or("");
                    out.insert(def.name.clone(), FieldValue::Text(clean(v)));
                }
                FieldDefKind::List => {
                    let prefix = format!("f.{}.", def.name);
                    let mut items: Vec<(usize, String)> = self
                        .0
                        .iter()
                        .filter_map(|(k, v)| {
                            k.strip_prefix(&prefix)
                                .and_then(|i| i.parse::<usize>().ok())
                                .map(|i| (i, clean(v)))
                        })
                        .filter(|(_, v)| !v.is_empty())
                        .collect();
                    items.sort_by_key(|(i, _)| *i);
                    out.insert(
                        def.name.clone(),
                        FieldValue::List(items.into_iter().map(|(_, v)| v).collect()),
                    );
                }
            }
        }
        Some(out)
    }
}

fn clean(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn review_error(e: ReviewError) -> Response {
    ApiError::from(e).into_response()
}

/// After an action: the draft page again with a message (or the error), or the next draft.
fn after_action(
    id: &str,
    back: &QueueQuery,
    result: Result<String, ReviewError>,
    next: Option<String>,
) -> Response {
    let qs = back.back();
    let sep = if qs.is_empty() { "" } else { "&" };
    match result {
        Ok(msg) => {
            let target = next.unwrap_or_else(|| id.to_string());
            Redirect::to(&format!(
                "/ui/drafts/{target}?{qs}{sep}msg={}",
                urlencode(&msg)
            ))
            .into_response()
        }
        Err(ReviewError::Store(e)) => ApiError::from(e).into_response(),
        Err(e) => Redirect::to(&format!(
            "/ui/drafts/{id}?{qs}{sep}err={}",
            urlencode(&e.to_string())
        ))
        .into_response(),
    }
}

/// The next open draft after `id` in the queue, to keep a reviewer moving.
async fn next_open(s: &AppState, back: &QueueQuery, id: &str) -> Option<String> {
    let mut f = back.filter(1).ok()?;
    f.after = Some(id.to_string());
    if f.status.is_none() {
        f.status = Some(DraftStatus::PendingReview);
    }
    store::drafts::list(&s.db, &f)
        .await
        .ok()?
        .into_iter()
        .next()
        .map(|d| d.id)
}

async fn approve(
    State(s): State<AppState>,
    Path(id): Path<String>,
    PageForm(r, form): PageForm,
) -> Response {
    let d = match store::drafts::get(&s.db, &id).await {
        Ok(d) => d,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let edit = match s.channels.get(&d.channel) {
        Ok(ch) => form.fields(ch),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let name = r.caller.actor();
    let result = review::approve(
        &s.db,
        &s.channels,
        &id,
        edit.as_ref(),
        &Actor {
            name: &name,
            expected_revision: form.revision(),
        },
    )
    .await
    .map(|c| {
        format!(
            "Approved {} / {} as version {}.",
            c.product_id, c.channel, c.version
        )
    });
    let back = form.back();
    let next = if result.is_ok() {
        next_open(&s, &back, &id).await
    } else {
        None
    };
    after_action(&id, &back, result, next)
}

async fn save_edit(
    State(s): State<AppState>,
    Path(id): Path<String>,
    PageForm(r, form): PageForm,
) -> Response {
    let d = match store::drafts::get(&s.db, &id).await {
        Ok(d) => d,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let Some(edit) = s
        .channels
        .get(&d.channel)
        .ok()
        .and_then(|ch| form.fields(ch))
    else {
        return ApiError::unprocessable("fields", "the form has no fields").into_response();
    };
    let name = r.caller.actor();
    let result = review::save_edit(
        &s.db,
        &s.channels,
        &id,
        &edit,
        &Actor {
            name: &name,
            expected_revision: form.revision(),
        },
    )
    .await
    .map(|_| "Edit saved.".to_string());
    after_action(&id, &form.back(), result, None)
}

async fn reject(
    State(s): State<AppState>,
    Path(id): Path<String>,
    PageForm(r, form): PageForm,
) -> Response {
    let name = r.caller.actor();
    let result = review::reject(
        &s.db,
        &id,
        form.get("reason").unwrap_or(""),
        &Actor {
            name: &name,
            expected_revision: form.revision(),
        },
    )
    .await
    .map(|d| format!("Rejected {} / {}.", d.product_id, d.channel));
    let back = form.back();
    let next = if result.is_ok() {
        next_open(&s, &back, &id).await
    } else {
        None
    };
    after_action(&id, &back, result, next)
}

async fn regenerate(
    State(s): State<AppState>,
    Path(id): Path<String>,
    PageForm(r, form): PageForm,
) -> Response {
    let name = r.caller.actor();
    let result = review::regenerate(
        &s.db,
        &id,
        form.get("feedback").unwrap_or(""),
        s.settings.worker.max_attempts,
        &Actor {
            name: &name,
            expected_revision: form.revision(),
        },
    )
    .await
    .map(|task| format!("A new draft is being generated (task {task})."));
    after_action(&id, &form.back(), result, None)
}

async fn comment(
    State(s): State<AppState>,
    Path(id): Path<String>,
    PageForm(r, form): PageForm,
) -> Response {
    let name = r.caller.actor();
    let result = review::comment(&s.db, &id, form.get("body").unwrap_or(""), &name)
        .await
        .map(|_| "Comment added.".to_string());
    after_action(&id, &form.back(), result, None)
}

async fn bulk_approve(State(s): State<AppState>, PageForm(r, form): PageForm) -> Response {
    let Some(batch) = form.get("batch").filter(|b| !b.is_empty()) else {
        return ApiError::unprocessable("batch", "is required").into_response();
    };
    let channel = form
        .get("channel")
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    let name = r.caller.actor();
    let out = review::bulk_approve(
        &s.db,
        &s.channels,
        &DraftFilter {
            status: Some(DraftStatus::PendingReview),
            batch_id: Some(batch.to_string()),
            channel: channel.clone(),
            limit: 500,
            ..Default::default()
        },
        &Actor {
            name: &name,
            expected_revision: None,
        },
    )
    .await;
    let qs = QueueQuery {
        status: Some("pending_review".into()),
        batch: Some(batch.to_string()),
        channel,
        ..Default::default()
    }
    .back();
    match out {
        Ok(o) => Redirect::to(&format!(
            "/ui/queue?{qs}&msg={}",
            urlencode(&format!(
                "Approved {} drafts; skipped {}.",
                o.approved.len(),
                o.skipped.len()
            ))
        ))
        .into_response(),
        Err(e) => review_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::InputLimits,
        spec::{validate, Position},
    };

    fn spec() -> ProductSpec {
        validate(
            serde_json::json!({"id": "p", "attributes": {"Cache": "24MB", "Part Number": "643770-B21"}}),
            Position::Single,
            &InputLimits::default(),
        )
        .unwrap()
    }

    #[test]
    fn segments_mark_findings_and_link_claims() {
        let f = Finding {
            rule: "phrase.forbidden".into(),
            field: "title".into(),
            item: None,
            severity: Severity::Error,
            message: "contains \"sale\"".into(),
            span: Some((0, 4)),
        };
        let segs = segments("Sale now: 24MB kit 643770-B21", &[&f], &spec());
        let kinds: Vec<(&str, &str)> = segs.iter().map(|s| (s.kind, s.text.as_str())).collect();
        assert_eq!(kinds[0], ("finding", "Sale"));
        assert!(kinds.contains(&("claim", "24MB")), "{kinds:?}");
        assert!(kinds.contains(&("claim", "643770-B21")), "{kinds:?}");
        let joined: String = segs.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(joined, "Sale now: 24MB kit 643770-B21");
    }

    #[test]
    fn spans_past_the_end_and_multibyte_text_do_not_panic() {
        let f = Finding {
            rule: "x".into(),
            field: "t".into(),
            item: None,
            severity: Severity::Warning,
            message: "m".into(),
            span: Some((3, 99)),
        };
        let segs = segments("über 😀 ok", &[&f], &spec());
        let joined: String = segs.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(joined, "über 😀 ok");
    }

    #[test]
    fn templates_compile() {
        assert!(TEMPLATES.as_ref().is_ok(), "{:?}", TEMPLATES.as_ref().err());
    }
}
