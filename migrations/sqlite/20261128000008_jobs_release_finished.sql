-- apalis-sqlite acknowledges finished jobs with `update Jobs ... from json_each(..)
-- where lock_by = <worker>`; a finished job keeps its lock_by, so every ack re-scanned all
-- the jobs a worker ever ran (quadratic over a batch). Finished jobs let go of their
-- worker; nothing reads lock_by of a finished job.
create trigger if not exists jobs_release_finished after update of status on Jobs
when new.status in ('Done', 'Killed') and new.lock_by is not null
begin
    update Jobs set lock_by = null where id = new.id;
end;
