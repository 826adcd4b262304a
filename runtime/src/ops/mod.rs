//! Operating a node: the admin API and functions deployed through it.

pub mod admin;
pub mod deployments;
