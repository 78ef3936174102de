//! The body log: request bodies of [`BODY_LOG_MIN`] bytes or more, appended to segment
//! files beside sled's own, instead of inside sled's tree nodes; and the journal of the
//! delivery keys whose `received` index items wait for a group commit (see "Frames").
//!
//! Why: sled 0.34 keeps values inside its leaf nodes, copies a whole leaf on every write to
//! it, splits leaves every ~8 inserts (~16 with `vendor/sled`'s leaves of 32) and rewrites
//! whole nodes into its log when it splits or consolidates one. With the body in the value,
//! every one of those costs the bodies of ~16 deliveries (the profile in BENCHMARKS.md:
//! node splits 9 % of the server's CPU, zeroed allocations 5 %, and 3x the body bytes on
//! disk). Here a body is written once, to the end of a file, and the record in sled holds a
//! [`BodyRef`]: segment, offset, length, CRC-32.
//!
//! # Durability and crashes
//!
//! A body is appended (a `write` to the OS) *before* the record that points at it is
//! inserted into sled, and the group commit syncs the body segments alongside sled's log
//! ([`super::disk`]) before it wakes anyone. So after a kill -9 every record has its body
//! (the OS holds both), and after a power loss every *acknowledged* record has. A record
//! nobody was told of may reach the disk without its body if the power fails between the
//! two syncs (or when the OS writes sled's pages back first, as it may at any time): its
//! sender retries, is answered from the record, and its runs fail on the body's checksum
//! (dead-lettered, and named by `store check`) rather than see wrong bytes. Bytes a crash
//! left without a record (a claim that lost its race, or died before its record) are
//! never read; they go with their segment. A body whose bytes do not match its CRC reads
//! as [`StoreError::Corrupt`], never as a wrong body.
//!
//! # Giving the space back
//!
//! Segments are never rewritten; one is deleted whole once every delivery that can point
//! into it has expired. Each segment has a *bound* in sled's `meta` tree: a received time
//! no delivery with a body in it exceeds. The bound is raised (a minute ahead, so about
//! one write a minute) before the first body that would exceed it is appended, so it is in
//! sled's log before any record that relies on it. Retention removes deliveries in
//! received order, so once the oldest delivery still stored was received after a sealed
//! segment's bound, nothing can point into that segment ([`BodyLog::reclaim`]). A segment
//! with no bound at open was never pointed at by a record that reached the disk: deleted.
//! Each process appends to a fresh segment, so a torn tail is never appended to.
//!
//! # Frames: the journal of held index items
//!
//! Every append is a *frame*: a header (the key's length, the body's length, a CRC-32 of
//! both and the key), a delivery key, then the body (none for a delivery whose body stays in
//! its record). The key is that of the delivery whose claim appended the frame, when its
//! `received` index item is held in memory for the next group commit (see `received`); a
//! [`BodyRef`] points at the body inside its frame, so reads are as before. A process that
//! dies holding items leaves, in the frames appended after the position `received`'s mark
//! holds (a [`BodyLog::position`] at most about a megabyte before its last batch entry), the
//! key of every claim whose record may have reached sled's log without its index item: the
//! next opening reads those frames ([`BodyLog::keys_from`]) instead of every record. A claim
//! appends its frame before its record is inserted, so after a kill -9 the OS holds the
//! frame of every record it holds. After a power loss it may not have written a frame back
//! whose record it did (as with a body, above): `received` says how such a record is found.
//! Segments written before frames existed hold bare bodies; no position a mark holds ever
//! points into one, so they are only read through [`BodyRef`]s.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::encoding::backend;
use crate::store::StoreError;

/// Bodies this long or longer go to the body log; shorter ones stay in the record's value,
/// where a read costs no second lookup.
pub const BODY_LOG_MIN: usize = 256;

/// By default a segment is sealed, and the next one started, once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// By default, how far past a body's received time a segment's bound is raised: bounds are
/// written about once per this long, not once per body, and a segment is deleted this much
/// later than it could be.
pub const BOUND_STEP_MS: u64 = 60_000;

/// How the body log cuts segments and raises their bounds.
#[derive(Debug, Clone, Copy)]
pub struct BodyLogSettings {
    /// Size at which a segment is sealed and the next begun.
    pub segment_bytes: u64,
    /// How far past a body's received time its segment's bound is raised.
    pub bound_step_ms: u64,
}

impl Default for BodyLogSettings {
    fn default() -> Self {
        BodyLogSettings {
            segment_bytes: SEGMENT_BYTES,
            bound_step_ms: BOUND_STEP_MS,
        }
    }
}

/// `meta` keys of segment bounds: this prefix, then the segment number (u64 BE).
const BOUND: &[u8] = b"body-segment\0";

/// Where a body lies in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyRef {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

impl BodyRef {
    /// Encoded length.
    pub const LEN: usize = 24;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&self.segment.to_be_bytes());
        out[8..16].copy_from_slice(&self.offset.to_be_bytes());
        out[16..20].copy_from_slice(&self.len.to_be_bytes());
        out[20..].copy_from_slice(&self.crc.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<BodyRef> {
        let bytes: &[u8; Self::LEN] = bytes.try_into().ok()?;
        let (segment, rest) = bytes.split_first_chunk::<8>()?;
        let (offset, rest) = rest.split_first_chunk::<8>()?;
        let (len, crc) = rest.split_first_chunk::<4>()?;
        Some(BodyRef {
            segment: u64::from_be_bytes(*segment),
            offset: u64::from_be_bytes(*offset),
            len: u32::from_be_bytes(*len),
            crc: u32::from_be_bytes(crc.try_into().ok()?),
        })
    }
}

/// Bytes before a frame's key: key length (u16 BE), body length (u32 BE), CRC-32 (u32 BE)
/// of the lengths and the key.
const FRAME_HEADER: usize = 10;

/// A place in the log: a segment and an offset in it (see [`BodyLog::position`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogPosition {
    pub segment: u64,
    pub offset: u64,
}

impl LogPosition {
    /// Encoded length.
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&self.segment.to_be_bytes());
        out[8..].copy_from_slice(&self.offset.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<LogPosition> {
        let bytes: &[u8; Self::LEN] = bytes.try_into().ok()?;
        let (segment, offset) = bytes.split_first_chunk::<8>()?;
        Some(LogPosition {
            segment: u64::from_be_bytes(*segment),
            offset: u64::from_be_bytes(offset.try_into().ok()?),
        })
    }
}

/// The CRC a frame's header carries: over its two lengths and its key.
fn frame_crc(lengths: &[u8], key: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(lengths);
    hasher.update(key);
    hasher.finalize()
}

/// The keys of the whole frames in `reader` (a segment from some frame's start on), in
/// order. Stops at the first frame that is cut short or whose header does not check: the
/// torn tail a crash leaves (nothing is appended after it: each process starts a segment).
fn frame_keys(reader: &mut std::io::BufReader<File>) -> std::io::Result<Vec<Vec<u8>>> {
    let mut keys = Vec::new();
    loop {
        let mut header = [0u8; FRAME_HEADER];
        if read_whole(reader, &mut header)?.is_none() {
            return Ok(keys);
        }
        let (lengths, crc) = header.split_at(6);
        let key_len = u16::from_be_bytes([lengths[0], lengths[1]]) as usize;
        let body_len = u32::from_be_bytes([lengths[2], lengths[3], lengths[4], lengths[5]]);
        let mut key = vec![0u8; key_len];
        if read_whole(reader, &mut key)?.is_none() || frame_crc(lengths, &key).to_be_bytes() != crc
        {
            return Ok(keys);
        }
        if !key.is_empty() {
            keys.push(key);
        }
        reader.seek_relative(i64::from(body_len))?;
    }
}

/// Fills `buf` from `reader`; `None` if the reader ends first.
fn read_whole(reader: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<Option<()>> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(Some(())),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// The segment being appended to.
struct Active {
    segment: u64,
    /// Created at the first append.
    file: Option<Arc<File>>,
    len: u64,
    /// The received time no body in this segment exceeds (as written to `meta`).
    bound: u64,
}

/// What the next sync must make durable.
#[derive(Default)]
struct Unsynced {
    files: HashMap<u64, Arc<File>>,
    new_file: bool,
}

/// The body log of one store.
pub struct BodyLog {
    dir: PathBuf,
    meta: sled::Tree,
    settings: BodyLogSettings,
    active: Mutex<Active>,
    /// Open segments, for reads.
    files: Mutex<HashMap<u64, Arc<File>>>,
    unsynced: Mutex<Unsynced>,
    /// Sealed segments and their bounds.
    sealed: Mutex<BTreeMap<u64, u64>>,
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("body log: {e}"))
}

/// The segment number of a file named like [`BodyLog::path`] makes them; `None` for any
/// other file.
fn segment_of(name: &std::ffi::OsStr) -> Option<u64> {
    let name = name.to_str()?.strip_suffix(".log")?;
    u64::from_str_radix(name, 16).ok()
}

fn bound_key(segment: u64) -> Vec<u8> {
    [BOUND, &segment.to_be_bytes()[..]].concat()
}

impl BodyLog {
    /// Opens the log in `dir` (created if absent): existing segments with a bound are kept,
    /// sealed; with `repair`, those without are deleted (see the module docs); appends go to
    /// a new one.
    pub fn open(
        dir: &Path,
        meta: sled::Tree,
        settings: BodyLogSettings,
        repair: bool,
    ) -> Result<BodyLog, StoreError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut sealed = BTreeMap::new();
        for entry in meta.scan_prefix(BOUND) {
            let (k, v) = entry.map_err(backend)?;
            let (Some(segment), Some(bound)) = (
                k.get(BOUND.len()..)
                    .and_then(|s| s.try_into().ok())
                    .map(u64::from_be_bytes),
                v.as_ref().try_into().ok().map(u64::from_be_bytes),
            ) else {
                return Err(StoreError::Corrupt("body segment bound".into()));
            };
            sealed.insert(segment, bound);
        }
        let mut last = sealed.keys().next_back().copied().unwrap_or(0);
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let Some(segment) = segment_of(&entry.file_name()) else {
                continue;
            };
            last = last.max(segment);
            if repair && !sealed.contains_key(&segment) {
                std::fs::remove_file(entry.path()).map_err(io)?;
            }
        }
        Ok(BodyLog {
            dir: dir.to_owned(),
            meta,
            settings,
            active: Mutex::new(Active {
                segment: last + 1,
                file: None,
                len: 0,
                bound: 0,
            }),
            files: Mutex::new(HashMap::new()),
            unsynced: Mutex::new(Unsynced::default()),
            sealed: Mutex::new(sealed),
        })
    }

    fn path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("{segment:016x}.log"))
    }

    /// Appends `body` of a delivery received at `received_at_ms` as a frame naming `key`
    /// (the delivery's key while its index item is held in memory, empty otherwise; see the
    /// module docs). Call before inserting the record that will hold the returned
    /// reference; with an empty `body`, the frame only journals `key`.
    pub fn append(
        &self,
        key: &[u8],
        body: &[u8],
        received_at_ms: u64,
    ) -> Result<BodyRef, StoreError> {
        let too_long = |what| StoreError::Backend(format!("{what} too long for the body log"));
        let len = u32::try_from(body.len()).map_err(|_| too_long("body"))?;
        let key_len = u16::try_from(key.len()).map_err(|_| too_long("delivery key"))?;
        let mut frame = Vec::with_capacity(FRAME_HEADER + key.len() + body.len());
        frame.extend_from_slice(&key_len.to_be_bytes());
        frame.extend_from_slice(&len.to_be_bytes());
        let crc = frame_crc(&frame, key);
        frame.extend_from_slice(&crc.to_be_bytes());
        frame.extend_from_slice(key);
        let body_at = frame.len() as u64;
        frame.extend_from_slice(body);
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.file.is_some() && active.len + frame.len() as u64 > self.settings.segment_bytes {
            self.seal(&mut active);
        }
        if received_at_ms > active.bound {
            let bound = received_at_ms.saturating_add(self.settings.bound_step_ms);
            self.meta
                .insert(bound_key(active.segment), &bound.to_be_bytes())
                .map_err(backend)?;
            active.bound = bound;
        }
        let file = match &active.file {
            Some(f) => f.clone(),
            None => {
                let f = Arc::new(
                    OpenOptions::new()
                        .create_new(true)
                        .append(true)
                        .read(true)
                        .open(self.path(active.segment))
                        .map_err(io)?,
                );
                self.files
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(active.segment, f.clone());
                self.unsynced
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .new_file = true;
                active.file = Some(f.clone());
                f
            }
        };
        if let Err(e) = (&*file).write_all(&frame) {
            // Part of it may be in the file: nothing more goes after it, so that the
            // offsets of this segment stay right.
            self.seal(&mut active);
            return Err(io(e));
        }
        let at = BodyRef {
            segment: active.segment,
            offset: active.len + body_at,
            len,
            crc: crc32fast::hash(body),
        };
        active.len += frame.len() as u64;
        self.unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .files
            .insert(active.segment, file);
        Ok(at)
    }

    /// Where the next frame will begin: every frame appended so far lies before it.
    pub fn position(&self) -> LogPosition {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        LogPosition {
            segment: active.segment,
            offset: active.len,
        }
    }

    /// The keys journaled in the frames at or after `from` (a [`BodyLog::position`] of this
    /// store's), in the order they were appended; a segment since deleted holds none.
    pub fn keys_from(&self, from: LogPosition) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut keys = Vec::new();
        for segment in self.segments()? {
            if segment < from.segment {
                continue;
            }
            let file = match File::open(self.path(segment)) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(e)),
            };
            let mut reader = std::io::BufReader::with_capacity(64 * 1024, file);
            if segment == from.segment {
                std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(from.offset))
                    .map_err(io)?;
            }
            keys.extend(frame_keys(&mut reader).map_err(io)?);
        }
        Ok(keys)
    }

    /// Seals the active segment (with the bound it has) and makes the next one active; its
    /// file is created at its first append.
    fn seal(&self, active: &mut Active) {
        self.sealed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(active.segment, active.bound);
        *active = Active {
            segment: active.segment + 1,
            file: None,
            len: 0,
            bound: 0,
        };
    }

    /// The body at `at`, checked against its CRC.
    pub fn read(&self, at: &BodyRef) -> Result<Bytes, StoreError> {
        let file = {
            let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
            match files.get(&at.segment) {
                Some(f) => f.clone(),
                None => {
                    let f = Arc::new(File::open(self.path(at.segment)).map_err(|e| {
                        StoreError::Corrupt(format!("body segment {}: {e}", at.segment))
                    })?);
                    files.insert(at.segment, f.clone());
                    f
                }
            }
        };
        let mut body = vec![0u8; at.len as usize];
        file.read_exact_at(&mut body, at.offset)
            .map_err(|e| StoreError::Corrupt(format!("body segment {}: {e}", at.segment)))?;
        if crc32fast::hash(&body) != at.crc {
            return Err(StoreError::Corrupt(format!(
                "body in segment {} at {}: checksum mismatch",
                at.segment, at.offset
            )));
        }
        Ok(Bytes::from(body))
    }

    /// Whether some body appended is not synced yet.
    pub fn has_unsynced(&self) -> bool {
        !self
            .unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .files
            .is_empty()
    }

    /// Makes every body appended so far durable. Run by the group commit before sled's
    /// flush, so that no record reaches the disk ahead of its body.
    pub fn sync(&self) -> std::io::Result<()> {
        let Unsynced { files, new_file } =
            std::mem::take(&mut *self.unsynced.lock().unwrap_or_else(|p| p.into_inner()));
        for file in files.values() {
            file.sync_data()?;
        }
        if new_file {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Sealed segments nothing points into any more. `oldest_received` reads the received
    /// time of the oldest delivery stored (`None`: none is); it is read *after* the sealed
    /// segments are listed, so every body in them was appended, and its delivery's
    /// received-time entry written, before the read.
    pub fn reclaimable(
        &self,
        oldest_received: impl FnOnce() -> Result<Option<u64>, StoreError>,
    ) -> Result<Vec<u64>, StoreError> {
        let sealed = self
            .sealed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let oldest = oldest_received()?;
        Ok(sealed
            .into_iter()
            .filter(|(_, bound)| oldest.is_none_or(|oldest| *bound < oldest))
            .map(|(segment, _)| segment)
            .collect())
    }

    /// Deletes `segments` (from [`BodyLog::reclaimable`]), once the removals of the
    /// deliveries that pointed into them are durable: the file first, then its bound (a
    /// crash in between leaves a bound without a file, which nothing reads).
    pub fn reclaim(&self, segments: &[u64]) -> Result<(), StoreError> {
        for segment in segments {
            self.files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(segment);
            match std::fs::remove_file(self.path(*segment)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            }
            self.meta.remove(bound_key(*segment)).map_err(backend)?;
            self.sealed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(segment);
        }
        Ok(())
    }

    /// Segment files present, for tests and `store check`.
    pub fn segments(&self) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            if let Some(segment) = segment_of(&entry.map_err(io)?.file_name()) {
                out.push(segment);
            }
        }
        out.sort_unstable();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> sled::Tree {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        db.open_tree("meta").expect("tree")
    }

    fn small() -> BodyLogSettings {
        BodyLogSettings {
            segment_bytes: 100,
            bound_step_ms: 10,
        }
    }

    #[test]
    fn bodies_read_back_across_segments_and_a_changed_byte_is_an_error() {
        let dir = tempfile::TempDir::new().expect("dir");
        let log = BodyLog::open(dir.path(), meta(), small(), true).expect("open");
        let bodies: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 40]).collect();
        let refs: Vec<BodyRef> = bodies
            .iter()
            .enumerate()
            .map(|(i, b)| log.append(&[], b, 1_000 + i as u64).expect("append"))
            .collect();
        // 40-byte bodies in 10-byte frame headers, in 100-byte segments: two a segment.
        assert_eq!(refs.last().map(|r| r.segment), Some(5));
        for (body, at) in bodies.iter().zip(&refs) {
            assert_eq!(BodyRef::decode(&at.encode()), Some(*at));
            assert_eq!(&log.read(at).expect("read")[..], &body[..]);
        }
        log.sync().expect("sync");
        let victim = refs[3];
        let path = log.path(victim.segment);
        let mut bytes = std::fs::read(&path).expect("segment");
        bytes[victim.offset as usize] ^= 0xff;
        std::fs::write(&path, bytes).expect("write");
        assert!(matches!(log.read(&victim), Err(StoreError::Corrupt(_))));
        assert_eq!(&log.read(&refs[2]).expect("neighbour")[..], &bodies[2][..]);
    }

    #[test]
    fn a_segment_is_reclaimable_once_the_oldest_stored_delivery_is_past_its_bound() {
        let dir = tempfile::TempDir::new().expect("dir");
        let log = BodyLog::open(dir.path(), meta(), small(), true).expect("open");
        log.append(&[], &[1; 60], 1_000).expect("append"); // segment 1, bound 1 010
        log.append(&[], &[2; 60], 2_000).expect("append"); // segment 2, bound 2 010
        log.append(&[], &[3; 60], 3_000).expect("append"); // segment 3, active
        let reclaimable = |oldest| log.reclaimable(|| Ok(oldest)).expect("reclaimable");
        assert_eq!(reclaimable(Some(1_000)), Vec::<u64>::new());
        assert_eq!(reclaimable(Some(1_010)), Vec::<u64>::new());
        assert_eq!(reclaimable(Some(1_011)), vec![1]);
        assert_eq!(reclaimable(Some(5_000)), vec![1, 2]);
        // Nothing stored: every sealed segment, never the active one.
        assert_eq!(reclaimable(None), vec![1, 2]);
        log.reclaim(&[1]).expect("reclaim");
        assert_eq!(log.segments().expect("segments"), vec![2, 3]);
    }

    #[test]
    fn reopening_keeps_bound_segments_drops_unbound_ones_and_appends_to_a_new_one() {
        let dir = tempfile::TempDir::new().expect("dir");
        let meta = meta();
        let first = {
            let log = BodyLog::open(dir.path(), meta.clone(), small(), true).expect("open");
            let at = log.append(&[], &[7; 60], 1_000).expect("append");
            log.sync().expect("sync");
            at
        };
        // A segment no record can point at: its bound never reached sled.
        std::fs::write(dir.path().join(format!("{:016x}.log", 9)), b"orphan").expect("orphan");
        let log = BodyLog::open(dir.path(), meta, small(), true).expect("reopen");
        assert_eq!(log.segments().expect("segments"), vec![first.segment]);
        assert_eq!(&log.read(&first).expect("read")[..], &[7; 60][..]);
        let next = log.append(&[], &[8; 10], 2_000).expect("append");
        assert_eq!(
            next.segment, 10,
            "after every segment seen, the orphan's number too"
        );
    }

    /// The keys journaled after a position come back in order, across segments, with the
    /// bodies around them still read through their references; a torn last frame (a crash
    /// mid-write) ends the scan and loses nothing before it.
    #[test]
    fn keys_after_a_position_are_read_back_up_to_a_torn_frame() {
        let dir = tempfile::TempDir::new().expect("dir");
        let log = BodyLog::open(dir.path(), meta(), small(), true).expect("open");
        log.append(b"src\0before", &[1; 30], 1_000).expect("append");
        let from = log.position();
        let body = log.append(b"src\0one", &[2; 30], 1_000).expect("append");
        log.append(b"src\0two", &[], 1_000).expect("key only");
        log.append(&[], &[3; 30], 1_000).expect("no key");
        log.append(b"src\0three", &[4; 40], 1_000).expect("append");
        let keys = |from| log.keys_from(from).expect("keys");
        assert_eq!(
            keys(from),
            vec![
                b"src\0one".to_vec(),
                b"src\0two".to_vec(),
                b"src\0three".to_vec()
            ]
        );
        assert!(log.position().segment > from.segment, "crossed a segment");
        assert_eq!(&log.read(&body).expect("read")[..], &[2; 30][..]);
        // A frame cut short at the end of the active segment.
        let tail = log.position();
        let path = log.path(tail.segment);
        let mut torn = std::fs::read(&path).expect("segment");
        torn.extend_from_slice(&[0, 9, 0, 0, 0, 0, 1, 2, 3, 4, b's']);
        std::fs::write(&path, torn).expect("write");
        assert_eq!(keys(from).len(), 3);
        assert_eq!(keys(tail), Vec::<Vec<u8>>::new());
        // A header that does not check (a changed key byte) ends its segment's scan; the
        // segments after it are read as before.
        let mut changed = std::fs::read(log.path(from.segment)).expect("segment");
        let key_at = from.offset as usize + FRAME_HEADER;
        changed[key_at] ^= 0xff;
        std::fs::write(log.path(from.segment), changed).expect("write");
        assert_eq!(
            keys(from),
            vec![b"src\0two".to_vec(), b"src\0three".to_vec()]
        );
    }
}
