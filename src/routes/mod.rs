//! HTTP routes: the public webhook endpoint and the admin listener's health checks.

pub mod health;
pub mod webhook;
