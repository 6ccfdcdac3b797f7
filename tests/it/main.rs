//! Integration tests: the real service over real HTTP on loopback, a real database
//! (SQLite file, and PostgreSQL for the tests generated per backend), real queue workers.

mod support;

mod api;
mod browser;
mod cli;
mod delivery;
mod injection;
mod input;
mod limits;
mod remote;
mod roles;
mod schema;
