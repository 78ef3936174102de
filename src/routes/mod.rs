//! HTTP routes: the public webhook endpoint and the admin listener's health checks.

pub mod admin;
pub mod health;
pub mod webhook;
