//! Hash maps and sets for the paths every delivery takes: the standard library's, with
//! foldhash's hasher instead of SipHash.
//!
//! Why: a delivery hashed keys ~76 times on its way from claim to run (the dispatcher's maps
//! of handler names, the group commit's writers, the run starts, the skip set, the metrics'
//! series), and SipHash was 3 % of its instructions (BENCHMARKS.md, session 22). foldhash is
//! the hasher `hashbrown` (the standard map's implementation) defaults to, already in the
//! dependency tree; its `RandomState` is seeded per process, so keys a sender chooses
//! (delivery ids reach the skip set) cannot be picked to collide.
//!
//! Maps off those paths (configuration, the operator's reads) keep the standard hasher.

/// A `HashMap` with foldhash's per-process seeded hasher.
pub type FastHashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A `HashSet` with foldhash's per-process seeded hasher.
pub type FastHashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
