-- storing a task's draft marks the task succeeded, in the same statement: one round trip
-- per finished task instead of a transaction of two
create or replace function drafts_mark_task_succeeded() returns trigger as $$
begin
    update tasks set status = 'succeeded', last_error = null, updated_at = new.created_at
    where id = new.task_id;
    return new;
end;
$$ language plpgsql;
drop trigger if exists drafts_mark_task_succeeded on drafts;
create trigger drafts_mark_task_succeeded after insert on drafts
    for each row execute function drafts_mark_task_succeeded();
