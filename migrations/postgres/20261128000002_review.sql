-- api_tokens: bearer tokens with roles; only a sha256 of the token is stored
create table if not exists api_tokens (
    id text primary key not null,
    name text not null,
    token_hash text not null unique,
    roles text not null,
    created_at bigint not null,
    created_by text,
    revoked_at bigint,
    last_used_at bigint
);

-- audit_log: append-only record of every change (who, when, what, before/after, why)
create table if not exists audit_log (
    id bigserial primary key,
    at bigint not null,
    actor text not null,
    action text not null,
    entity_type text not null,
    entity_id text not null,
    before text,
    after text,
    reason text
);
create index if not exists audit_entity on audit_log(entity_type, entity_id);
create or replace function audit_log_append_only() returns trigger as $$
begin
    raise exception 'audit_log is append-only';
end;
$$ language plpgsql;
drop trigger if exists audit_log_no_change on audit_log;
create trigger audit_log_no_change before update or delete on audit_log
    for each row execute function audit_log_append_only();

-- comments on drafts
create table if not exists comments (
    id text primary key not null,
    draft_id text not null references drafts(id),
    author text not null,
    body text not null,
    created_at bigint not null
);
create index if not exists comments_draft on comments(draft_id);

-- browser sessions of the review page (cookie holds a random id; only its hash is stored)
create table if not exists sessions (
    id_hash text primary key not null,
    token_id text not null references api_tokens(id),
    csrf text not null,
    created_at bigint not null,
    expires_at bigint not null
);
