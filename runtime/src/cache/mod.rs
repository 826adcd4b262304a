//! The node's shared edge cache, behind the Cache API of every isolate and route caching.

pub mod edge_cache;
