-- batches: one submission (a file, an API call) of products x channels
create table if not exists batches (
    id text primary key not null,
    created_at bigint not null,
    source text not null,
    channels text not null,
    products bigint not null,
    input_errors bigint not null,
    submitted_by text
);

-- specs: the validated product specs of a batch, as received (extra fields kept)
create table if not exists specs (
    id text primary key not null,
    batch_id text not null references batches(id),
    product_id text not null,
    position text not null,
    body text not null,
    created_at bigint not null
);
create index if not exists specs_product on specs(product_id);
create index if not exists specs_batch on specs(batch_id);

-- input_errors: records of a submission that were refused, with the reason
create table if not exists input_errors (
    id integer primary key autoincrement,
    batch_id text not null references batches(id),
    position text not null,
    product_id text,
    field text not null,
    message text not null
);
create index if not exists input_errors_batch on input_errors(batch_id);

-- tasks: one per (spec, channel); the unit of queueing, retry and failure
create table if not exists tasks (
    id text primary key not null,
    batch_id text not null references batches(id),
    spec_id text not null references specs(id),
    product_id text not null,
    channel text not null,
    status text not null check (status in ('queued', 'running', 'retrying', 'succeeded', 'failed')),
    attempts bigint not null default 0,
    max_attempts bigint not null,
    last_error text,
    feedback text,
    parent_draft_id text,
    created_at bigint not null,
    updated_at bigint not null
);
create index if not exists tasks_batch_status on tasks(batch_id, status);

-- drafts: generated copy waiting for (or past) human review; one per task at most
create table if not exists drafts (
    id text primary key not null,
    task_id text not null unique references tasks(id),
    batch_id text not null references batches(id),
    spec_id text not null references specs(id),
    product_id text not null,
    channel text not null,
    status text not null check (status in ('pending_review', 'needs_attention', 'approved', 'rejected', 'changes_requested')),
    fields text not null,
    edited_fields text,
    findings text not null,
    provenance text not null,
    rules_version text not null,
    attempts bigint not null,
    revision bigint not null default 0,
    parent_draft_id text,
    reviewed_by text,
    reviewed_at bigint,
    reject_reason text,
    created_at bigint not null,
    updated_at bigint not null
);
create index if not exists drafts_status_channel on drafts(status, channel);
create index if not exists drafts_batch on drafts(batch_id);
create index if not exists drafts_product_channel on drafts(product_id, channel);

-- approved_content: the approved copy per (product, channel), versioned; a newer approval
-- supersedes (never overwrites) the previous version
create table if not exists approved_content (
    id text primary key not null,
    product_id text not null,
    channel text not null,
    version bigint not null,
    draft_id text not null references drafts(id),
    fields text not null,
    generated_fields text not null,
    provenance text not null,
    approved_by text not null,
    approved_at bigint not null,
    superseded_at bigint,
    unique (product_id, channel, version)
);
create index if not exists approved_current on approved_content(product_id, channel, superseded_at);
