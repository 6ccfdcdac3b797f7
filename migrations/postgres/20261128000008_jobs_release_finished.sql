-- SQLite needs a trigger to keep apalis's acknowledgements linear (see the SQLite
-- migration of the same number); PostgreSQL plans that query with a join and needs
-- nothing. This file keeps the two migration folders in step.
select 1;
