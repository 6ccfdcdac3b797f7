-- rate_windows: requests and tokens per provider per minute, shared by every worker that
-- uses this database (fixed one-minute windows)
create table if not exists rate_windows (
    provider text not null,
    window_start bigint not null,
    requests bigint not null default 0,
    tokens bigint not null default 0,
    primary key (provider, window_start)
);

-- token_usage: tokens spent per UTC day and provider (daily budget)
create table if not exists token_usage (
    day text not null,
    provider text not null,
    tokens bigint not null default 0,
    primary key (day, provider)
);

-- batch budgets: a batch over its token budget pauses instead of spending on
alter table batches add column token_budget bigint;
alter table batches add column tokens_used bigint not null default 0;
alter table batches add column paused_reason text;

-- a parked task waits (status queued) for its batch's budget to be raised or the day to turn
alter table tasks add column parked_reason text;
alter table tasks add column generation bigint not null default 0;
