-- tokens each draft spent (prompt + completion): batch budgets sum these instead of
-- updating one counter row per batch from every worker
alter table drafts add column tokens bigint not null default 0;
