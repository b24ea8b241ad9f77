//! The `taskmesh` binary's library: assembling services into a mesh, starting the
//! infrastructure `taskmesh up` needs, and bootstrapping the development tenant.
//!
//! # Layout
//! - [`mesh`]: start any set of services in this process, stop them together.
//! - [`infra`]: private `nats-server` and Postgres child processes for `taskmesh up`.
//! - [`bootstrap`]: the `default` tenant and its admin key in `.taskmesh/api-key`.
//! - [`cli`]: the client commands (`run`, `runs`, `logs`).

pub mod bootstrap;
pub mod cli;
pub mod infra;
pub mod mesh;
