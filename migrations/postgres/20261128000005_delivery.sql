-- outbox_events: one event per approved version, written in the approval's transaction.
-- `seq` is the pull feed's cursor: assigned in commit order (see store/outbox.rs), so a
-- reader that has seen seq n has seen every event below n.
create table if not exists outbox_events (
    id text primary key not null,
    seq bigint not null unique,
    type text not null,
    product_id text not null,
    channel text not null,
    version bigint not null,
    approved_content_id text not null references approved_content(id),
    payload text not null,
    created_at bigint not null
);
create index if not exists outbox_events_channel_seq on outbox_events(channel, seq);

-- webhook_subscriptions: where to POST events. `secret` signs every request (HMAC-SHA256),
-- so it is stored as given (it must be usable, it cannot be hashed); it is never listed.
create table if not exists webhook_subscriptions (
    id text primary key not null,
    url text not null,
    secret text not null,
    event_types text not null,
    channel text,
    description text,
    created_at bigint not null,
    created_by text not null,
    removed_at bigint
);

-- webhook_deliveries: one per (subscription, event); the delivery queue and its state.
-- Claimed with a lease (locked_by, locked_until); delivered in event order per
-- (subscription, product).
create table if not exists webhook_deliveries (
    id text primary key not null,
    subscription_id text not null references webhook_subscriptions(id),
    event_id text not null references outbox_events(id),
    event_seq bigint not null,
    product_id text not null,
    status text not null check (status in ('pending', 'delivered', 'dead', 'cancelled')),
    attempts bigint not null default 0,
    next_attempt_at bigint not null,
    retry_from bigint not null,
    locked_by text,
    locked_until bigint,
    last_status_code bigint,
    last_error text,
    delivered_at bigint,
    dead_at bigint,
    created_at bigint not null,
    updated_at bigint not null,
    unique (subscription_id, event_id)
);
create index if not exists webhook_deliveries_due on webhook_deliveries(status, next_attempt_at);
create index if not exists webhook_deliveries_order on webhook_deliveries(subscription_id, product_id, event_seq);

-- webhook_attempts: the delivery log, one row per HTTP attempt
create table if not exists webhook_attempts (
    id text primary key not null,
    delivery_id text not null references webhook_deliveries(id),
    attempt bigint not null,
    started_at bigint not null,
    latency_ms bigint not null,
    status_code bigint,
    outcome text not null check (outcome in ('delivered', 'retry', 'failed')),
    error text,
    response_snippet text
);
create index if not exists webhook_attempts_delivery on webhook_attempts(delivery_id, attempt);
