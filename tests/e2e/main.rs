//! End-to-end tests: whole meshes in this process (and, where a crash is the point, services
//! as child processes) against real NATS JetStream and Postgres.

mod helpers;

mod access;
mod admission;
mod cache;
mod cli;
mod contract;
mod crash;
mod dashboard;
mod deploy;
mod engine;
mod events;
mod flows;
mod integrations;
mod kinds;
mod lanes;
mod lists;
mod logs;
mod metrics;
mod pooler;
mod projection;
mod requests;
mod retention;
mod schedules;
mod scheduling;
mod secrets;
mod tenancy;
mod validation;
