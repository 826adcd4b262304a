//! Operating a node: the admin API, functions deployed through it, and `outpost dev`'s
//! reload on file changes.

pub mod admin;
pub mod deployments;
pub mod dev;
