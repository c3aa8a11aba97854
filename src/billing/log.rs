//! The spool's storage: an append-only log of segment files in
//! `<data dir>/billing-spool/`, written by the spool writer thread only.
//!
//! Why not SQLite (the first spool was a table with a row per VM per
//! commit): at 10,000 VMs that is 10,000 B-tree inserts and, a minute
//! later, 10,000 deletes a second, every page written twice (WAL, then
//! checkpoint) — most of the metering budget. Here a group commit is ONE
//! `pwrite` of one frame plus one `fdatasync`, acknowledgements are a few
//! bytes in the next frame, and space comes back by unlinking whole
//! segments. (Hand-written: no crate offers a crash-safe multi-file log
//! with per-entry deletion.)
//!
//! A frame (one group commit) holds entries: chunks, deletions and partial
//! acknowledgements of chunks, and the metered-VM table; its encoding is in
//! [`super::frame`]. Replay applies entries in order; a later chunk entry
//! with the same id replaces the earlier one (thinning and relocation
//! rewrite chunks that way).
//!
//! A bad frame (short, impossible length or failed checksum) with no valid
//! frame after it at the end of the last segment is a torn tail (a crash
//! mid-write leaves at most the last frame torn): it is cut off. Any other
//! bad frame is damage: replay goes on at the next valid frame — where the
//! bad frame's length points, else the next offset whose payload decodes as
//! entries and whose checksum holds (within a bound on the work; past it,
//! the rest of the last segment is set aside in a `.damaged-<offset>` file
//! and cut off) — and every VM whose records the damaged bytes may have
//! held is reported ([`Recovered::gaps`]) so that a gap notice is sent for
//! it. Segments roll at
//! [`SEGMENT_BYTES`]; each starts with a checkpoint of the metered-VM table
//! and the next chunk id, so old segments can go. A segment is removed
//! when it is the oldest and holds no live chunk. Only the oldest goes: a
//! chunk's deletion and acknowledgement entries are in its own or younger
//! segments, so they never outlive the chunk they cancel. Live chunks of
//! the oldest segment are copied forward when the log holds more than twice
//! the live data (a VM whose batches stall must not pin every segment after
//! its oldest chunk).

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::warn;

use super::error::LogError;
use super::frame::{ChunkHead, Frame};
use super::frame::{Entry, HEADER, RESYNC_BUDGET, Resync, frame_at, next_entry, resync};

/// A segment is closed once it is this big (about 13 s of samples at
/// 10,000 VMs; smaller segments give space back sooner).
pub const SEGMENT_BYTES: u64 = 16 << 20;

/// How far a segment grows past its current map before a read maps it
/// again (see `SegFile::view`).
const REMAP_BYTES: u64 = 1 << 20;

/// Slack above twice the live data, in segments, before the oldest
/// segment's live chunks are copied forward.
const COMPACT_SLACK_SEGMENTS: u64 = 4;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LogError {
    let path = path.display().to_string();
    move |source| LogError::Io { op, path, source }
}

/// Where a live chunk's entry is.
#[derive(Debug, Clone, Copy)]
struct Loc {
    seg: u64,
    /// Entry start in the segment file.
    off: u64,
    len: u32,
    /// Offset of the records within the entry.
    data_off: u32,
    skip: u32,
}

impl Loc {
    fn data_len(&self) -> u64 {
        u64::from(self.len.saturating_sub(self.data_off))
    }
}

/// Where each live chunk is, by id. Ids are handed out in order and die
/// roughly in order (as batches are acknowledged), so a window of slots
/// from the oldest live id on is a map without hashing: 10,000 inserts and
/// deletes a second at scale.
#[derive(Default)]
struct Locs {
    /// Id of `slots[0]`.
    base: i64,
    slots: std::collections::VecDeque<Option<Loc>>,
}

impl Locs {
    fn slot(&self, id: i64) -> Option<usize> {
        usize::try_from(id.checked_sub(self.base)?).ok()
    }

    fn get(&self, id: &i64) -> Option<&Loc> {
        self.slots.get(self.slot(*id)?)?.as_ref()
    }

    fn get_mut(&mut self, id: &i64) -> Option<&mut Loc> {
        let k = self.slot(*id)?;
        self.slots.get_mut(k)?.as_mut()
    }

    fn insert(&mut self, id: i64, loc: Loc) -> Option<Loc> {
        if self.slots.is_empty() {
            self.base = id;
        }
        if id < self.base {
            // Only replay of an odd log gets here: grow at the front.
            let n = usize::try_from(self.base - id).unwrap_or(usize::MAX);
            for _ in 0..n {
                self.slots.push_front(None);
            }
            self.base = id;
        }
        let k = self.slot(id).unwrap_or(usize::MAX);
        if k >= self.slots.len() {
            self.slots.resize(k + 1, None);
        }
        self.slots[k].replace(loc)
    }

    fn remove(&mut self, id: &i64) -> Option<Loc> {
        let k = self.slot(*id)?;
        let old = self.slots.get_mut(k)?.take();
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
        }
        old
    }

    fn iter(&self) -> impl Iterator<Item = (i64, &Loc)> {
        let base = self.base;
        self.slots.iter().enumerate().filter_map(move |(k, l)| Some((base + i64::try_from(k).ok()?, l.as_ref()?)))
    }
}

/// An open segment and a read-only memory map of it. The sender reads a
/// batch as ~60 small chunks scattered over a minute of commits; through
/// the map that is memory copies from the page cache, not ~60 `pread`
/// system calls.
struct SegFile {
    file: File,
    /// The map and the file's length when it was made.
    map: Mutex<Option<(Arc<memmap2::Mmap>, u64)>>,
    /// How much to map at first (past the end of a growing segment, so one
    /// map serves it while it fills).
    reserve: u64,
}

impl SegFile {
    fn new(file: File, reserve: u64) -> SegFile {
        SegFile { file, map: Mutex::new(None), reserve }
    }

    /// A map covering at least the first `end` bytes. (The one `unsafe` of
    /// the spool: mapping a file is how the OS offers reads without a
    /// system call each.) A growing segment is mapped afresh once it grew
    /// [`REMAP_BYTES`] past the last map: pages the sender read through a
    /// map stay in metald's RSS until the map goes, so one map kept for
    /// the whole 16 MiB segment made the RSS grow with it.
    #[allow(unsafe_code)]
    fn view(&self, end: u64) -> io::Result<Arc<memmap2::Mmap>> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, mapped_at)) = m.as_ref()
            && v.len() as u64 >= end
            && end <= mapped_at.saturating_add(REMAP_BYTES)
        {
            return Ok(v.clone());
        }
        let file_len = self.file.metadata()?.len();
        if file_len < end {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunk past the end of its segment"));
        }
        let len = usize::try_from(file_len.max(self.reserve)).map_err(io::Error::other)?;
        // SAFETY: the log is append-only: bytes a chunk location points at
        // are written once, before the location exists, and never changed
        // or cut off afterwards (truncation after a failed write cuts only
        // bytes no location points at). Pages past the end of the file are
        // mapped but never read: every read is of a located chunk.
        let v = Arc::new(unsafe { memmap2::MmapOptions::new().len(len).map(&self.file)? });
        *m = Some((v.clone(), file_len));
        Ok(v)
    }
}

/// What readers share with the writer: where each live chunk is, and the
/// open segment files (a reader keeps its `Arc<SegFile>`, so a segment
/// removed meanwhile still reads).
#[derive(Default)]
struct Index {
    locs: Locs,
    files: HashMap<u64, Arc<SegFile>>,
}

/// Reads chunks for the sender (any thread).
#[derive(Clone)]
pub struct Reader {
    index: Arc<Mutex<Index>>,
}

impl Reader {
    /// The records blob of each chunk of `ids` (`None`: not in the log).
    pub fn read(&self, ids: &[i64]) -> Result<Vec<Option<Vec<u8>>>, LogError> {
        let mut out = Vec::with_capacity(ids.len());
        self.read_with(ids, |_, b| {
            out.push(b.map(<[u8]>::to_vec));
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` with each chunk of `ids` in order and its records blob
    /// (`None`: not in the log), straight from the segment's memory map.
    pub fn read_with<E: From<LogError>>(
        &self,
        ids: &[i64],
        mut f: impl FnMut(i64, Option<&[u8]>) -> Result<(), E>,
    ) -> Result<(), E> {
        let found: Vec<Option<(Arc<SegFile>, Loc)>> = {
            let ix = self.index.lock().unwrap_or_else(|p| p.into_inner());
            ids.iter().map(|id| ix.locs.get(id).and_then(|l| Some((ix.files.get(&l.seg)?.clone(), *l)))).collect()
        };
        for (found, &id) in found.into_iter().zip(ids) {
            let Some((seg, loc)) = found else {
                f(id, None)?;
                continue;
            };
            let (from, to) = (loc.off + u64::from(loc.data_off), loc.off + u64::from(loc.len));
            let err = |source| LogError::Io { op: "reading chunk", path: format!("chunk {id}"), source };
            let view = seg.view(to).map_err(err)?;
            let data = usize::try_from(from)
                .ok()
                .zip(usize::try_from(to).ok())
                .and_then(|(a, b)| view.get(a..b))
                .ok_or(LogError::Corrupt(id))?;
            f(id, Some(data))?;
        }
        Ok(())
    }
}

/// A chunk read back: its head and records blob.
pub type Chunk = (ChunkHead<String>, Vec<u8>);

/// A live chunk found by replay.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub head: ChunkHead<String>,
    /// Bytes of its records.
    pub bytes: u64,
}

/// What the log held when opened.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Live chunks by id.
    pub chunks: BTreeMap<i64, Replayed>,
    /// Metered VMs: customer and time of the last record.
    pub meter: HashMap<String, (String, i64)>,
    /// VMs whose records damaged bytes may have held: customer, and the
    /// time of the last record known before the damage (a gap notice is
    /// due from there).
    pub gaps: BTreeMap<String, (String, i64)>,
    /// Damaged regions skipped (each one or more bad frames).
    pub corrupt_frames: u64,
    /// The latest record time seen anywhere in the log.
    pub latest_ts: i64,
    /// Set at the first damage: the latest record time before it. VMs first
    /// seen after it may have had records in the damage too.
    damaged_since: Option<i64>,
    /// Each VM's latest chunk record time so far.
    vm_last: HashMap<String, i64>,
}

impl Recovered {
    /// Damage at this point of replay: every VM metered now may have lost
    /// records.
    fn damage(&mut self) {
        self.corrupt_frames += 1;
        let since = *self.damaged_since.get_or_insert(self.latest_ts);
        for (vm, (customer, ts)) in &self.meter {
            // From the VM's last record replayed (its metering start if none).
            let last = self.vm_last.get(vm).copied().unwrap_or(*ts);
            self.gaps.entry(vm.clone()).or_insert_with(|| (customer.clone(), last.min(since)));
        }
    }

    /// `vm` of `customer` appears after damage: it may have lost records.
    fn seen(&mut self, vm: &str, customer: &str) {
        if let Some(since) = self.damaged_since
            && !self.meter.contains_key(vm)
            && !self.gaps.contains_key(vm)
        {
            self.gaps.insert(vm.to_owned(), (customer.to_owned(), since));
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Seg {
    live: u64,
    live_bytes: u64,
    len: u64,
}

pub struct Log {
    dir: PathBuf,
    segment_bytes: u64,
    cur_no: u64,
    segs: BTreeMap<u64, Seg>,
    index: Arc<Mutex<Index>>,
    next_id: i64,
    needs_checkpoint: bool,
    /// A failed write could not be cut off: the next frame goes to a new segment.
    broken: bool,
    /// See [`RESYNC_BUDGET`].
    resync_budget: u64,
}

/// Takes a chunk's old place off its segment's live count.
fn forget(segs: &mut BTreeMap<u64, Seg>, l: Loc) {
    if let Some(s) = segs.get_mut(&l.seg) {
        s.live = s.live.saturating_sub(1);
        s.live_bytes = s.live_bytes.saturating_sub(l.data_len());
    }
}

fn seg_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:020}.log"))
}

impl Log {
    /// Opens (creating) the log in `dir` and replays it.
    pub fn open(dir: &Path) -> Result<(Log, Recovered), LogError> {
        Log::open_with(dir, SEGMENT_BYTES)
    }

    /// [`Log::open`] with segments of `segment_bytes` (tests use small ones).
    pub fn open_with(dir: &Path, segment_bytes: u64) -> Result<(Log, Recovered), LogError> {
        Log::open_budget(dir, segment_bytes, RESYNC_BUDGET)
    }

    /// [`Log::open_with`] spending at most `resync_budget` per damaged
    /// region looking for the next valid frame.
    fn open_budget(dir: &Path, segment_bytes: u64, resync_budget: u64) -> Result<(Log, Recovered), LogError> {
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        let mut nos: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io_err("listing", dir))?
            .filter_map(|e| {
                let name = e.ok()?.file_name();
                name.to_str()?.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        nos.sort_unstable();
        let fresh = nos.is_empty();
        if fresh {
            create_segment(dir, 1)?;
            nos.push(1);
        }
        let last = nos[nos.len() - 1];
        let mut log = Log {
            dir: dir.to_path_buf(),
            segment_bytes,
            cur_no: last,
            segs: BTreeMap::new(),
            index: Arc::default(),
            next_id: 1,
            needs_checkpoint: fresh,
            broken: false,
            resync_budget,
        };
        let mut rec = Recovered::default();
        for &no in &nos {
            log.replay_segment(no, no == last, &mut rec)?;
        }
        if let Some((&max, _)) = rec.chunks.last_key_value() {
            log.next_id = log.next_id.max(max + 1);
        }
        Ok((log, rec))
    }

    /// Open segment `no`.
    fn seg(&self, no: u64) -> Option<Arc<SegFile>> {
        self.index.lock().unwrap_or_else(|p| p.into_inner()).files.get(&no).cloned()
    }

    fn replay_segment(&mut self, no: u64, last: bool, rec: &mut Recovered) -> Result<(), LogError> {
        let path = seg_path(&self.dir, no);
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io_err("opening", &path))?;
        let bytes = std::fs::read(&path).map_err(io_err("reading", &path))?;
        let mut pos = 0usize;
        let mut ix = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let segs = &mut self.segs;
        segs.insert(no, Seg::default());
        // Where replay stopped for good: `bytes.len()`, or a bad frame with
        // no valid one after it.
        let mut tail = bytes.len();
        let mut gave_up = false;
        while pos + HEADER <= bytes.len() {
            let Some(end) = frame_at(&bytes, pos) else {
                match resync(&bytes, pos, self.resync_budget) {
                    Resync::At(next) => {
                        warn!(
                            segment = %path.display(),
                            from = pos,
                            to = next,
                            "billing spool: damaged frames skipped; gap notices follow for the VMs they may have held"
                        );
                        rec.damage();
                        pos = next;
                        continue;
                    }
                    Resync::End => {
                        tail = pos;
                        break;
                    }
                    Resync::GaveUp => {
                        // Not known to be a torn tail: damage.
                        warn!(
                            segment = %path.display(),
                            offset = pos,
                            "billing spool: no valid frame found after damage within the search budget; the rest of the segment is not replayed, gap notices follow"
                        );
                        rec.damage();
                        tail = pos;
                        gave_up = true;
                        break;
                    }
                }
            };
            let payload = &bytes[pos + HEADER..end];
            let mut b = payload;
            while !b.is_empty() {
                let at = payload.len() - b.len();
                let Some(e) = next_entry(&mut b) else {
                    warn!(segment = %path.display(), offset = pos + HEADER + at, "billing spool: undecodable entry; skipping the rest of its frame");
                    break;
                };
                match e {
                    Entry::Chunk { head, data_off, len } => {
                        rec.seen(head.vm, head.customer);
                        rec.latest_ts = rec.latest_ts.max(head.last_ts);
                        let last = rec.vm_last.entry(head.vm.to_owned()).or_insert(head.last_ts);
                        *last = (*last).max(head.last_ts);
                        let loc = Loc { seg: no, off: (pos + HEADER + at) as u64, len, data_off, skip: head.skip };
                        if let Some(old) = ix.locs.insert(head.id, loc) {
                            forget(segs, old);
                        }
                        let s = segs.entry(no).or_default();
                        s.live += 1;
                        s.live_bytes += loc.data_len();
                        rec.chunks.insert(head.id, Replayed { head: head.owned(), bytes: loc.data_len() });
                        self.next_id = self.next_id.max(head.id + 1);
                    }
                    Entry::Delete(id) => {
                        if let Some(old) = ix.locs.remove(&id) {
                            forget(segs, old);
                        }
                        rec.chunks.remove(&id);
                    }
                    Entry::Skip(id, n) => {
                        if let Some(l) = ix.locs.get_mut(&id) {
                            l.skip = n;
                        }
                        if let Some(c) = rec.chunks.get_mut(&id) {
                            c.head.skip = n;
                        }
                    }
                    Entry::Meter(vm, customer, ts) => {
                        rec.seen(vm, customer);
                        rec.latest_ts = rec.latest_ts.max(ts);
                        rec.meter.insert(vm.to_owned(), (customer.to_owned(), ts));
                    }
                    Entry::Unmeter(vm) => {
                        rec.meter.remove(vm);
                    }
                    Entry::Touch(vm, ts) => {
                        rec.latest_ts = rec.latest_ts.max(ts);
                        if let Some(m) = rec.meter.get_mut(vm) {
                            m.1 = ts;
                        }
                    }
                    Entry::NextId(id) => self.next_id = self.next_id.max(id),
                }
            }
            pos = end;
        }
        if pos + HEADER > bytes.len() && pos < bytes.len() {
            // Fewer bytes than a header after the last valid frame.
            tail = pos;
        }
        if gave_up {
            if last {
                // Appends go at the end of what was replayed (a later start
                // must not find older chunks behind newer ones with the
                // same ids): the unread rest is kept aside, then cut off.
                set_aside(&path, &bytes[tail..], tail);
                file.set_len(tail as u64).map_err(io_err("truncating", &path))?;
            }
        } else if tail != bytes.len() {
            // A crash mid-write tears the last frame of the last segment;
            // anything else is damage.
            if last {
                warn!(segment = %path.display(), offset = tail, "billing spool: cutting off a torn frame at the end");
                file.set_len(tail as u64).map_err(io_err("truncating", &path))?;
            } else {
                warn!(segment = %path.display(), offset = tail, "billing spool: damaged frames end this segment; gap notices follow");
                rec.damage();
            }
        }
        if let Some(s) = segs.get_mut(&no) {
            s.len = tail.min(bytes.len()) as u64;
        }
        ix.files.insert(no, Arc::new(SegFile::new(file, 2 * self.segment_bytes)));
        Ok(())
    }

    pub fn reader(&self) -> Reader {
        Reader { index: self.index.clone() }
    }

    /// A new chunk id (ids grow: per VM, id order is record order).
    pub fn next_id(&mut self) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub fn peek_next_id(&self) -> i64 {
        self.next_id
    }

    /// Whether the current segment is full (or unusable) and the next
    /// frame should start a new one.
    pub fn should_roll(&self) -> bool {
        self.broken || self.segs.get(&self.cur_no).is_some_and(|s| s.len >= self.segment_bytes)
    }

    /// Whether the next frame must carry a checkpoint (the metered-VM table
    /// and [`Frame::checkpoint`]): the current segment has none yet.
    pub fn needs_checkpoint(&self) -> bool {
        self.needs_checkpoint
    }

    /// Starts a new segment.
    pub fn roll(&mut self) -> Result<(), LogError> {
        let no = self.cur_no + 1;
        let seg = SegFile::new(create_segment(&self.dir, no)?, 2 * self.segment_bytes);
        self.index.lock().unwrap_or_else(|p| p.into_inner()).files.insert(no, Arc::new(seg));
        self.segs.insert(no, Seg::default());
        self.cur_no = no;
        self.needs_checkpoint = true;
        self.broken = false;
        Ok(())
    }

    /// Writes `frame` durably (one `pwrite`, one `fdatasync`) and makes its
    /// chunks readable. On failure nothing of it counts and the segment is
    /// cut back (or, failing that, the next frame starts a new segment).
    pub fn append(&mut self, mut frame: Frame) -> Result<(), LogError> {
        if frame.is_empty() {
            return Ok(());
        }
        let path = seg_path(&self.dir, self.cur_no);
        let at = self.segs.get(&self.cur_no).map_or(0, |s| s.len);
        let len = u32::try_from(frame.buf.len() - HEADER).unwrap_or(u32::MAX);
        let crc = crc32fast::hash(&frame.buf[HEADER..]);
        frame.buf[..4].copy_from_slice(&len.to_le_bytes());
        frame.buf[4..8].copy_from_slice(&crc.to_le_bytes());
        let Some(cur) = self.seg(self.cur_no) else {
            self.broken = true;
            return Err(io_err("writing", &path)(io::Error::from(io::ErrorKind::NotFound)));
        };
        let cur = &cur.file;
        let written = cur.write_all_at(&frame.buf, at).and_then(|()| cur.sync_data());
        if let Err(e) = written {
            if cur.set_len(at).and_then(|()| cur.sync_data()).is_err() {
                self.broken = true;
            }
            return Err(io_err("writing", &path)(e));
        }
        let no = self.cur_no;
        let mut ix = self.index.lock().unwrap_or_else(|p| p.into_inner());
        for &(id, start, len, data_off, skip) in &frame.chunks {
            let loc = Loc { seg: no, off: at + start as u64, len, data_off, skip };
            if let Some(old) = ix.locs.insert(id, loc) {
                forget(&mut self.segs, old);
            }
            let s = self.segs.entry(no).or_default();
            s.live += 1;
            s.live_bytes += loc.data_len();
        }
        for id in &frame.deletes {
            if let Some(old) = ix.locs.remove(id) {
                forget(&mut self.segs, old);
            }
        }
        for &(id, n) in &frame.skips {
            if let Some(l) = ix.locs.get_mut(&id) {
                l.skip = n;
            }
        }
        drop(ix);
        if let Some(s) = self.segs.get_mut(&no) {
            s.len = at + frame.buf.len() as u64;
        }
        if frame.checkpoint {
            self.needs_checkpoint = false;
        }
        Ok(())
    }

    /// A live chunk's head and records (thinning reads it back).
    pub fn read_chunk(&self, id: i64) -> Result<Option<Chunk>, LogError> {
        let Some((seg, loc)) = self.locate(id) else { return Ok(None) };
        let entry = read_entry(&seg.file, &loc, id)?;
        let mut b = entry.as_slice();
        match next_entry(&mut b) {
            Some(Entry::Chunk { head, data_off, len }) => {
                let h = ChunkHead { id, skip: loc.skip, ..head.owned() };
                let data = entry.get(data_off as usize..len as usize).ok_or(LogError::Corrupt(id))?.to_vec();
                Ok(Some((h, data)))
            }
            _ => Err(LogError::Corrupt(id)),
        }
    }

    fn locate(&self, id: i64) -> Option<(Arc<SegFile>, Loc)> {
        let ix = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let loc = *ix.locs.get(&id)?;
        Some((ix.files.get(&loc.seg)?.clone(), loc))
    }

    /// Removes the oldest segments while they hold no live chunk (never the
    /// current one, never while its checkpoint is not written).
    pub fn collect(&mut self) {
        while !self.needs_checkpoint {
            let Some((&no, s)) = self.segs.first_key_value() else { break };
            if no == self.cur_no || s.live > 0 {
                break;
            }
            let path = seg_path(&self.dir, no);
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != io::ErrorKind::NotFound
            {
                warn!(segment = %path.display(), error = %e, "billing spool: removing a spent segment failed");
                break;
            }
            self.segs.remove(&no);
            self.index.lock().unwrap_or_else(|p| p.into_inner()).files.remove(&no);
        }
    }

    /// When the log holds more than twice its live data (plus slack), adds
    /// copies of the oldest segment's live chunks to `frame`, so that
    /// segment can go after the frame is written.
    pub fn compact_into(&self, frame: &mut Frame) -> Result<usize, LogError> {
        let (disk, live) = self.segs.values().fold((0, 0), |(d, l), s| (d + s.len, l + s.live_bytes));
        if disk <= 2 * live + COMPACT_SLACK_SEGMENTS * self.segment_bytes {
            return Ok(0);
        }
        let Some((&oldest, s)) = self.segs.first_key_value() else { return Ok(0) };
        if oldest == self.cur_no || s.live == 0 {
            return Ok(0);
        }
        let mut moving: Vec<(i64, Loc)> = {
            let ix = self.index.lock().unwrap_or_else(|p| p.into_inner());
            ix.locs.iter().filter(|(_, l)| l.seg == oldest).map(|(id, l)| (id, *l)).collect()
        };
        moving.sort_unstable_by_key(|m| m.0);
        let Some(seg) = self.seg(oldest) else { return Ok(0) };
        for (id, loc) in &moving {
            let entry = read_entry(&seg.file, loc, *id)?;
            frame.raw_chunk(*id, &entry, loc.data_off, loc.skip);
        }
        Ok(moving.len())
    }

    /// Segment files now.
    pub fn segments(&self) -> usize {
        self.segs.len()
    }
}

/// Keeps the unread rest of the last segment, from `offset`, in
/// `<segment>.damaged-<offset>` (the log ignores the file; for a person to
/// look at). Best effort: gap notices cover what it held either way.
fn set_aside(path: &Path, rest: &[u8], offset: usize) {
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".damaged-{offset}"));
    let aside = PathBuf::from(aside);
    match std::fs::write(&aside, rest).and_then(|()| File::open(&aside)?.sync_all()) {
        Ok(()) => {
            warn!(segment = %path.display(), kept = %aside.display(), "billing spool: the unread rest of the segment is set aside")
        }
        Err(e) => {
            warn!(segment = %path.display(), error = %e, "billing spool: setting aside the unread rest of the segment failed; it is cut off")
        }
    }
}

/// Creates segment `no` (its name synced to disk before anything relies on it).
fn create_segment(dir: &Path, no: u64) -> Result<File, LogError> {
    let path = seg_path(dir, no);
    let file =
        OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(io_err("creating", &path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("syncing", dir))?;
    Ok(file)
}

fn read_entry(file: &File, loc: &Loc, id: i64) -> Result<Vec<u8>, LogError> {
    let mut entry = vec![0; loc.len as usize];
    file.read_exact_at(&mut entry, loc.off).map_err(|source| LogError::Io {
        op: "reading chunk",
        path: format!("chunk {id}"),
        source,
    })?;
    Ok(entry)
}

#[cfg(test)]
#[path = "log_tests.rs"]
mod tests;
