//! Operating a node: the admin API, functions deployed through it, `outpost dev`'s reload on
//! file changes, and `outpost init`'s function templates.

pub mod admin;
pub mod deployments;
pub mod dev;
pub mod init;
