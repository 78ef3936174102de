//! A sled tree that counts its writes (`store_writes_total{tree}`): what a delivery costs
//! the store is a number the benchmark reads, not an estimate from reading the code.
//!
//! Reads go straight to the tree (through `Deref`); the write methods the store uses are
//! shadowed here and count one write each before they run.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Labels of `store_writes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TreeLabels {
    /// The tree written.
    pub tree: &'static str,
}

/// Writes per tree, registered by the metrics as `store_writes_total`.
pub type WriteCounts = Family<TreeLabels, Counter>;

/// A tree and its write counter.
#[derive(Clone)]
pub(super) struct CountedTree {
    tree: sled::Tree,
    writes: Counter,
}

impl std::ops::Deref for CountedTree {
    type Target = sled::Tree;

    fn deref(&self) -> &sled::Tree {
        &self.tree
    }
}

impl CountedTree {
    /// `tree`, counting into `counts` under `name`.
    pub(super) fn new(tree: sled::Tree, name: &'static str, counts: &WriteCounts) -> CountedTree {
        CountedTree {
            tree,
            writes: counts.get_or_create(&TreeLabels { tree: name }).clone(),
        }
    }

    /// [`sled::Tree::insert`], counted.
    pub(super) fn insert<K: AsRef<[u8]>, V: Into<sled::IVec>>(
        &self,
        key: K,
        value: V,
    ) -> sled::Result<Option<sled::IVec>> {
        self.writes.inc();
        self.tree.insert(key, value)
    }

    /// [`sled::Tree::remove`], counted.
    pub(super) fn remove<K: AsRef<[u8]>>(&self, key: K) -> sled::Result<Option<sled::IVec>> {
        self.writes.inc();
        self.tree.remove(key)
    }

    /// [`sled::Tree::compare_and_swap`], counted.
    pub(super) fn compare_and_swap<K, OV, NV>(
        &self,
        key: K,
        old: Option<OV>,
        new: Option<NV>,
    ) -> sled::Result<Result<(), sled::CompareAndSwapError>>
    where
        K: AsRef<[u8]>,
        OV: AsRef<[u8]>,
        NV: Into<sled::IVec>,
    {
        self.writes.inc();
        self.tree.compare_and_swap(key, old, new)
    }

    /// [`sled::Tree::fetch_and_update`], counted.
    pub(super) fn fetch_and_update<K, V, F>(&self, key: K, f: F) -> sled::Result<Option<sled::IVec>>
    where
        K: AsRef<[u8]>,
        F: FnMut(Option<&[u8]>) -> Option<V>,
        V: Into<sled::IVec>,
    {
        self.writes.inc();
        self.tree.fetch_and_update(key, f)
    }
}
