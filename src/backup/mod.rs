//! Backups of a cluster's user data, and restoring one into a new cluster
//! (docs/operations.md, "Backup and restore").
//!
//! A backup is a directory:
//! - `region-NNNNN.kv`, one per user region as routed when the backup began: every live key
//!   of the region's range as of the backup's cluster revision, in key order, each a
//!   length-delimited `KeyValue` (key, value, create and mod revision, version, lease);
//! - `manifest.json`: the format, the source cluster, the revision, the regions with each
//!   file's key count, size and SHA-256, and the leases the keys are attached to;
//! - `manifest.sha256`: the SHA-256 of `manifest.json`, written last: a backup without it
//!   is incomplete.
//!
//! [`verify`] reads all of it before a restore writes anything.
//!
//! Invariants:
//! - every key of a backup is read at the one revision in its manifest, so the backup is
//!   the cluster's user data exactly as of that revision (docs/architecture.md, "Reads at a
//!   revision");
//! - a backup is never held in memory: it is written and verified one record at a time;
//! - a backup that [`verify`] accepts has regions that tile the user keyspace, keys in
//!   strictly increasing order inside their region's range, revisions at or below the
//!   backup's, and a lease entry for every lease a key names.

pub mod restore;
pub mod take;

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::proto::KeyValue;

/// The format this build writes and reads.
pub const FORMAT: &str = "tessera-backup-1";
pub const MANIFEST: &str = "manifest.json";
pub const MANIFEST_SUM: &str = "manifest.sha256";
/// Largest record a backup may hold: a key and a value of the largest sizes a write takes,
/// with room to spare. Anything larger is corruption, not data.
const MAX_RECORD_BYTES: u64 = 64 << 20;

/// The name of region `i`'s file.
pub fn region_file(i: usize) -> String {
    format!("region-{i:05}.kv")
}

/// What `manifest.json` says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// The cluster the backup was taken of.
    pub cluster_id: u64,
    /// Every key is as of this cluster revision.
    pub revision: u64,
    /// The cluster's revision when the backup finished: revisions up to it were in use.
    pub end_revision: u64,
    /// When the backup was taken (ms since the Unix epoch).
    pub created_at_ms: u64,
    pub regions: Vec<RegionEntry>,
    pub leases: Vec<LeaseEntry>,
    pub keys: u64,
    pub bytes: u64,
}

/// One user region's range and file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionEntry {
    /// Range in hex (`""` = the keyspace's start; the last region ends at the system
    /// keyspace, `"ff"`).
    pub start: String,
    pub end: String,
    pub file: String,
    pub keys: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// A lease keys of the backup are attached to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseEntry {
    pub id: u64,
    pub ttl_ms: u64,
    /// When it expires unless renewed (ms since the Unix epoch), as seen by the backup.
    pub deadline_ms: u64,
}

/// Why a backup could not be taken, read or restored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The backup is incomplete, damaged or not a backup.
    #[error("backup {path} is not usable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(transparent)]
    Client(#[from] crate::client::Error),
    /// The restore cannot go ahead (nothing was written).
    #[error("{0}")]
    Refused(String),
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

pub use tessera_api::hex::{decode as unhex, encode as hex};

/// Writes records to one file, hashing as it goes.
pub(crate) struct RecordWriter {
    path: PathBuf,
    out: std::io::BufWriter<File>,
    hash: Sha256,
    pub keys: u64,
    pub bytes: u64,
}

impl RecordWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let f = File::create(path).map_err(io(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: std::io::BufWriter::with_capacity(1 << 20, f),
            hash: Sha256::new(),
            keys: 0,
            bytes: 0,
        })
    }

    pub fn write(&mut self, kv: &KeyValue) -> Result<()> {
        let buf = kv.encode_length_delimited_to_vec();
        self.out.write_all(&buf).map_err(io(&self.path))?;
        self.hash.update(&buf);
        self.keys += 1;
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// Flushes and syncs the file; returns its SHA-256 in hex.
    pub fn finish(self) -> Result<String> {
        let f = self.out.into_inner().map_err(|e| Error::Io {
            path: self.path.clone(),
            source: e.into_error(),
        })?;
        f.sync_all().map_err(io(&self.path))?;
        Ok(hex(&self.hash.finalize()))
    }
}

/// Reads one file's records, hashing as it goes.
pub(crate) struct RecordReader {
    path: PathBuf,
    input: BufReader<File>,
    hash: Sha256,
    pub bytes: u64,
}

impl RecordReader {
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(io(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            input: BufReader::with_capacity(1 << 20, f),
            hash: Sha256::new(),
            bytes: 0,
        })
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.input.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                corrupt(&self.path, format!("truncated at byte {}", self.bytes))
            } else {
                Error::Io {
                    path: self.path.clone(),
                    source: e,
                }
            }
        })?;
        self.hash.update(&*buf);
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// The next record, `None` at a clean end of file.
    pub fn next_record(&mut self) -> Result<Option<KeyValue>> {
        // The length prefix: a varint of at most 10 bytes.
        let mut len: u64 = 0;
        for i in 0..10 {
            let mut b = [0u8; 1];
            if i == 0 {
                match self.input.read(&mut b).map_err(io(&self.path))? {
                    0 => return Ok(None),
                    _ => {
                        self.hash.update(b);
                        self.bytes += 1;
                    }
                }
            } else {
                self.read_exact(&mut b)?;
            }
            len |= u64::from(b[0] & 0x7F) << (7 * i);
            if b[0] & 0x80 == 0 {
                break;
            }
            if i == 9 {
                return Err(corrupt(&self.path, "a record length does not end"));
            }
        }
        if len > MAX_RECORD_BYTES {
            return Err(corrupt(
                &self.path,
                format!("a record of {len} bytes at byte {}", self.bytes),
            ));
        }
        let mut buf = vec![0u8; len as usize];
        self.read_exact(&mut buf)?;
        KeyValue::decode(buf.as_slice())
            .map(Some)
            .map_err(|e| corrupt(&self.path, format!("a record does not decode: {e}")))
    }

    /// The SHA-256 of everything read, in hex.
    pub fn digest(self) -> String {
        hex(&self.hash.finalize())
    }
}

/// The SHA-256 of `bytes`, in hex.
pub fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Writes `manifest.json`, then its checksum: the backup is complete only once both are.
pub(crate) fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let body = serde_json::to_vec_pretty(m).map_err(|e| Error::Refused(e.to_string()))?;
    for (name, data) in [
        (MANIFEST, body.clone()),
        (MANIFEST_SUM, format!("{}\n", sha256(&body)).into_bytes()),
    ] {
        let path = dir.join(name);
        let mut f = File::create(&path).map_err(io(&path))?;
        f.write_all(&data).map_err(io(&path))?;
        f.sync_all().map_err(io(&path))?;
    }
    // The directory entries too.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

/// What a restoring cluster takes: keys and values above these sizes are refused.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_key_size: usize,
    pub max_value_size: usize,
}

/// Revisions a backup may name: far enough below `u64::MAX` (and i64's) that a restored
/// cluster still has room for every revision bump and oracle window.
const MAX_REVISION: u64 = 1 << 62;

/// A region of a backup, decoded.
#[derive(Clone, Debug)]
pub struct BackupRegion {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
    pub path: PathBuf,
    pub keys: u64,
}

/// A backup that [`verify`] read in full.
#[derive(Clone, Debug)]
pub struct Verified {
    pub manifest: Manifest,
    pub regions: Vec<BackupRegion>,
}

/// Reads the manifest and checks its checksum and its own consistency (nothing else).
pub fn read_manifest(dir: &Path) -> Result<(Manifest, Vec<BackupRegion>)> {
    let path = dir.join(MANIFEST);
    let body = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(corrupt(
                dir,
                "no manifest.json: not a backup, or an unfinished one",
            ))
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let sum_path = dir.join(MANIFEST_SUM);
    let sum = match std::fs::read_to_string(&sum_path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(corrupt(
                dir,
                "no manifest.sha256: the backup did not finish",
            ))
        }
        Err(e) => return Err(io(&sum_path)(e)),
    };
    if sum.trim() != sha256(&body) {
        return Err(corrupt(
            &path,
            "its SHA-256 is not the one in manifest.sha256",
        ));
    }
    let m: Manifest = serde_json::from_slice(&body)
        .map_err(|e| corrupt(&path, format!("does not parse: {e}")))?;
    if m.format != FORMAT {
        return Err(corrupt(
            &path,
            format!("format {:?}; this build reads {FORMAT:?}", m.format),
        ));
    }
    let user_end = vec![tessera_api::keys::SYSTEM_KEY_PREFIX];
    let mut expect: Vec<u8> = Vec::new();
    let mut regions = Vec::with_capacity(m.regions.len());
    for (i, r) in m.regions.iter().enumerate() {
        let (Some(start), Some(end)) = (unhex(&r.start), unhex(&r.end)) else {
            return Err(corrupt(&path, format!("region {i}: a bound is not hex")));
        };
        if start != expect || end <= start || end > user_end {
            return Err(corrupt(
                &path,
                format!(
                    "region {i} [{}, {}) does not continue the ones before",
                    r.start, r.end
                ),
            ));
        }
        if r.file != region_file(i) {
            return Err(corrupt(
                &path,
                format!("region {i}: unexpected file {:?}", r.file),
            ));
        }
        expect = end.clone();
        regions.push(BackupRegion {
            start,
            end,
            path: dir.join(&r.file),
            keys: r.keys,
        });
    }
    if expect != user_end {
        return Err(corrupt(&path, "the regions do not cover the user keyspace"));
    }
    let sum = m
        .regions
        .iter()
        .try_fold(0u64, |acc, r| acc.checked_add(r.keys));
    if sum != Some(m.keys) {
        return Err(corrupt(&path, "the regions' key counts do not add up"));
    }
    if m.revision == 0 || m.revision > m.end_revision || m.end_revision > MAX_REVISION {
        return Err(corrupt(&path, "its revisions are not valid"));
    }
    let max_ttl = tessera_api::limits::MAX_LEASE_TTL.as_millis() as u64;
    for (i, l) in m.leases.iter().enumerate() {
        if l.id == 0 || l.id > i64::MAX as u64 || l.ttl_ms == 0 || l.ttl_ms > max_ttl {
            return Err(corrupt(&path, format!("lease {} is not valid", l.id)));
        }
        if i > 0 && m.leases[i - 1].id >= l.id {
            return Err(corrupt(&path, "the leases are not in increasing id order"));
        }
    }
    Ok((m, regions))
}

/// Reads every record of region `r`'s file, checking it against the manifest, and hands
/// each to `each`.
pub fn read_region(
    m: &Manifest,
    limits: &Limits,
    i: usize,
    r: &BackupRegion,
    mut each: impl FnMut(KeyValue) -> Result<()>,
) -> Result<()> {
    let entry = &m.regions[i];
    let mut rd = RecordReader::open(&r.path)?;
    let mut last: Option<Vec<u8>> = None;
    let mut keys = 0u64;
    while let Some(kv) = rd.next_record()? {
        let bad = |why: &str| corrupt(&r.path, format!("record {keys}: {why}"));
        if kv.key < r.start || kv.key >= r.end {
            return Err(bad("key outside the region"));
        }
        if last.as_ref().is_some_and(|l| kv.key <= *l) {
            return Err(bad("keys out of order"));
        }
        if kv.key.is_empty() || kv.key.len() > limits.max_key_size {
            return Err(bad("key empty or over the key size limit"));
        }
        if kv.value.len() > limits.max_value_size {
            return Err(bad("value over the value size limit"));
        }
        if kv.version == 0
            || kv.create_revision == 0
            || kv.create_revision > kv.mod_revision
            || kv.mod_revision > m.revision
        {
            return Err(bad("revisions not valid for the backup"));
        }
        if kv.lease != 0 && m.leases.binary_search_by_key(&kv.lease, |l| l.id).is_err() {
            return Err(bad("attached to a lease the manifest does not list"));
        }
        last = Some(kv.key.clone());
        keys += 1;
        each(kv)?;
    }
    if rd.bytes != entry.bytes || keys != entry.keys {
        return Err(corrupt(
            &r.path,
            format!(
                "{keys} keys in {} bytes; the manifest says {} keys in {} bytes",
                rd.bytes, entry.keys, entry.bytes
            ),
        ));
    }
    if rd.digest() != entry.sha256 {
        return Err(corrupt(&r.path, "its SHA-256 is not the manifest's"));
    }
    Ok(())
}

/// Reads the whole backup and checks every file against the manifest.
pub fn verify(dir: &Path, limits: &Limits, mut progress: impl FnMut(u64)) -> Result<Verified> {
    let (manifest, regions) = read_manifest(dir)?;
    let mut done = 0;
    for (i, r) in regions.iter().enumerate() {
        read_region(&manifest, limits, i, r, |_| {
            done += 1;
            if done % 4096 == 0 {
                progress(done);
            }
            Ok(())
        })?;
    }
    progress(done);
    Ok(Verified { manifest, regions })
}

#[cfg(test)]
mod tests;
