//! The log's frame encoding: a [`Frame`] is the entries of one group
//! commit, encoded as they are added; `next_entry` decodes them again on
//! replay and reads. Imports only [`super::codec`] (its varints).
//!
//! Frame: `u32 LE payload length | u32 LE CRC-32 of the payload | payload`,
//! the payload a sequence of entries: chunks (one VM's records since the
//! previous commit, id-numbered, ids grow), deletions and partial
//! acknowledgements of chunks, and the metered-VM table (meter / unmeter /
//! touch), plus a segment's checkpoint (the next chunk id).
//!
//! Finding frames again after damage (`resync`) is here too: it is a
//! question about the encoding (which bytes could be a frame).

use prost::encoding::decode_varint;

use super::codec::{put_varint, unzigzag as unzz, zigzag as zz};

/// Bytes of a frame's header (payload length and CRC).
pub(super) const HEADER: usize = 8;

const T_CHUNK: u8 = 1;
const T_DELETE: u8 = 2;
const T_SKIP: u8 = 3;
const T_METER: u8 = 4;
const T_UNMETER: u8 = 5;
const T_TOUCH: u8 = 6;
const T_NEXT_ID: u8 = 7;

/// A chunk's description, as written before its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHead<S> {
    pub id: i64,
    pub vm: S,
    pub customer: S,
    pub records: u32,
    pub events: u32,
    pub first_ts: i64,
    pub last_ts: i64,
    /// Records at the front already acknowledged.
    pub skip: u32,
    pub thinned: bool,
}

impl ChunkHead<&str> {
    pub(super) fn owned(&self) -> ChunkHead<String> {
        ChunkHead {
            id: self.id,
            vm: self.vm.to_owned(),
            customer: self.customer.to_owned(),
            records: self.records,
            events: self.events,
            first_ts: self.first_ts,
            last_ts: self.last_ts,
            skip: self.skip,
            thinned: self.thinned,
        }
    }
}

/// The entries of one group commit, encoded as they are added.
pub struct Frame {
    /// The header's room, then the entries.
    pub(super) buf: Vec<u8>,
    /// (id, entry start in `buf`, entry length, offset of the records in
    /// the entry, skip).
    pub(super) chunks: Vec<(i64, usize, u32, u32, u32)>,
    pub(super) deletes: Vec<i64>,
    pub(super) skips: Vec<(i64, u32)>,
    pub(super) checkpoint: bool,
}

impl Default for Frame {
    fn default() -> Self {
        Frame::new()
    }
}

fn put_str(s: &str, out: &mut Vec<u8>) {
    put_varint(s.len() as u64, out);
    out.extend_from_slice(s.as_bytes());
}

impl Frame {
    pub fn new() -> Frame {
        Frame { buf: vec![0; HEADER], chunks: Vec::new(), deletes: Vec::new(), skips: Vec::new(), checkpoint: false }
    }

    /// A frame with room for `bytes` (a writer passes the size of its last
    /// frame: a 1.3 MB buffer grown by doubling is copied ~18 times).
    pub fn with_capacity(bytes: usize) -> Frame {
        let mut f = Frame::new();
        f.buf.reserve(bytes);
        f
    }

    pub fn is_empty(&self) -> bool {
        self.buf.len() == HEADER
    }

    /// Encoded bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Appends a chunk whose records `encode` writes.
    pub fn chunk(&mut self, h: &ChunkHead<&str>, encode: impl FnOnce(&mut Vec<u8>)) {
        let start = self.buf.len();
        let b = &mut self.buf;
        b.push(T_CHUNK);
        put_varint(zz(h.id), b);
        put_str(h.vm, b);
        put_str(h.customer, b);
        put_varint(u64::from(h.records), b);
        put_varint(u64::from(h.events), b);
        put_varint(zz(h.first_ts), b);
        put_varint(zz(h.last_ts), b);
        put_varint(u64::from(h.skip), b);
        b.push(u8::from(h.thinned));
        let len_at = b.len();
        b.extend_from_slice(&[0; 4]);
        let data_at = b.len();
        encode(b);
        let data_len = u32::try_from(b.len() - data_at).unwrap_or(u32::MAX);
        b[len_at..data_at].copy_from_slice(&data_len.to_le_bytes());
        self.chunks.push((
            h.id,
            start,
            u32::try_from(b.len() - start).unwrap_or(u32::MAX),
            u32::try_from(data_at - start).unwrap_or(u32::MAX),
            h.skip,
        ));
    }

    /// Appends a chunk entry as read back from the log (relocation).
    pub(super) fn raw_chunk(&mut self, id: i64, entry: &[u8], data_off: u32, skip: u32) {
        let start = self.buf.len();
        self.buf.extend_from_slice(entry);
        self.chunks.push((id, start, u32::try_from(entry.len()).unwrap_or(u32::MAX), data_off, skip));
        if skip > 0 {
            self.skip(id, skip);
        }
    }

    pub fn delete(&mut self, id: i64) {
        self.buf.push(T_DELETE);
        put_varint(zz(id), &mut self.buf);
        self.deletes.push(id);
    }

    pub fn skip(&mut self, id: i64, n: u32) {
        self.buf.push(T_SKIP);
        put_varint(zz(id), &mut self.buf);
        put_varint(u64::from(n), &mut self.buf);
        self.skips.push((id, n));
    }

    /// `vm` is metered (or was, and is not settled yet); its last record's time.
    pub fn meter(&mut self, vm: &str, customer: &str, last_ts: i64) {
        self.buf.push(T_METER);
        put_str(vm, &mut self.buf);
        put_str(customer, &mut self.buf);
        put_varint(zz(last_ts), &mut self.buf);
    }

    pub fn unmeter(&mut self, vm: &str) {
        self.buf.push(T_UNMETER);
        put_str(vm, &mut self.buf);
    }

    /// A metered VM's last record time moved on.
    pub fn touch(&mut self, vm: &str, last_ts: i64) {
        self.buf.push(T_TOUCH);
        put_str(vm, &mut self.buf);
        put_varint(zz(last_ts), &mut self.buf);
    }

    /// Marks this frame as the segment's checkpoint: the writer put the
    /// whole metered-VM table in it (see `Log::needs_checkpoint`).
    pub fn checkpoint(&mut self, next_id: i64) {
        self.buf.push(T_NEXT_ID);
        put_varint(zz(next_id), &mut self.buf);
        self.checkpoint = true;
    }
}

/// One decoded entry.
pub(super) enum Entry<'a> {
    Chunk { head: ChunkHead<&'a str>, data_off: u32, len: u32 },
    Delete(i64),
    Skip(i64, u32),
    Meter(&'a str, &'a str, i64),
    Unmeter(&'a str),
    Touch(&'a str, i64),
    NextId(i64),
}

fn get_u64(b: &mut &[u8]) -> Option<u64> {
    decode_varint(b).ok()
}

fn get_u32(b: &mut &[u8]) -> Option<u32> {
    u32::try_from(get_u64(b)?).ok()
}

fn get_i64(b: &mut &[u8]) -> Option<i64> {
    Some(unzz(get_u64(b)?))
}

fn get_str<'a>(b: &mut &'a [u8]) -> Option<&'a str> {
    let n = usize::try_from(get_u64(b)?).ok()?;
    if b.len() < n {
        return None;
    }
    let (s, rest) = b.split_at(n);
    *b = rest;
    std::str::from_utf8(s).ok()
}

/// Decodes the entry at the front of `b` and moves past it.
pub(super) fn next_entry<'a>(b: &mut &'a [u8]) -> Option<Entry<'a>> {
    let whole = *b;
    let (&tag, rest) = b.split_first()?;
    *b = rest;
    Some(match tag {
        T_CHUNK => {
            let id = get_i64(b)?;
            let vm = get_str(b)?;
            let customer = get_str(b)?;
            let records = get_u32(b)?;
            let events = get_u32(b)?;
            let first_ts = get_i64(b)?;
            let last_ts = get_i64(b)?;
            let skip = get_u32(b)?;
            let (&thinned, rest) = b.split_first()?;
            let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
            let data_off = whole.len() - rest.len() + 4;
            let end = data_off.checked_add(usize::try_from(n).ok()?)?;
            if end > whole.len() {
                return None;
            }
            *b = &whole[end..];
            let head = ChunkHead { id, vm, customer, records, events, first_ts, last_ts, skip, thinned: thinned != 0 };
            Entry::Chunk { head, data_off: u32::try_from(data_off).ok()?, len: u32::try_from(end).ok()? }
        }
        T_DELETE => Entry::Delete(get_i64(b)?),
        T_SKIP => Entry::Skip(get_i64(b)?, get_u32(b)?),
        T_METER => Entry::Meter(get_str(b)?, get_str(b)?, get_i64(b)?),
        T_UNMETER => Entry::Unmeter(get_str(b)?),
        T_TOUCH => Entry::Touch(get_str(b)?, get_i64(b)?),
        T_NEXT_ID => Entry::NextId(get_i64(b)?),
        _ => return None,
    })
}

/// No frame is this big (a commit of 10,000 VMs is ~1.5 MB).
const MAX_FRAME: u64 = 1 << 30;

/// Most work (bytes checksummed, plus [`ENTRY_COST`] per entry decoded)
/// spent looking for the next valid frame after damage: a bound on what a
/// damaged segment can cost at start.
pub(super) const RESYNC_BUDGET: u64 = 1 << 30;

/// What decoding one entry counts for against [`RESYNC_BUDGET`].
const ENTRY_COST: u64 = 32;

/// The end of the valid frame at `pos`, if one is there: a non-empty
/// payload (no empty frame is ever written) within the file whose checksum
/// holds.
pub(super) fn frame_at(bytes: &[u8], pos: usize) -> Option<usize> {
    let (len, crc) = header_at(bytes, pos)?;
    let end = pos.checked_add(HEADER)?.checked_add(len)?;
    let payload = bytes.get(pos + HEADER..end)?;
    (crc32fast::hash(payload) == crc).then_some(end)
}

/// The payload length and checksum of a plausible frame header at `pos`
/// (a length that is neither zero nor over [`MAX_FRAME`]).
fn header_at(bytes: &[u8], pos: usize) -> Option<(usize, u32)> {
    let header = bytes.get(pos..pos.checked_add(HEADER)?)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?);
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    if len == 0 || u64::from(len) > MAX_FRAME {
        return None;
    }
    Some((usize::try_from(len).ok()?, crc))
}

/// Where replay goes on after a bad frame.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Resync {
    /// At the next valid frame, here.
    At(usize),
    /// Nowhere: no valid frame follows.
    End,
    /// Unknown: [`RESYNC_BUDGET`] ran out first (a valid frame may follow).
    GaveUp,
}

/// The start of the next valid frame after a bad one at `pos`: where the
/// bad frame's own length points (damage inside a payload), else the first
/// later offset whose payload decodes as entries and whose checksum holds.
pub(super) fn resync(bytes: &[u8], pos: usize, mut budget: u64) -> Resync {
    if let Some((len, _)) = header_at(bytes, pos)
        && let Some(next) = (pos + HEADER).checked_add(len)
        && frame_at(bytes, next).is_some()
    {
        return Resync::At(next);
    }
    for off in pos + 1..bytes.len().saturating_sub(HEADER) {
        let Some((len, _)) = header_at(bytes, off) else { continue };
        let Some(payload) = (off + HEADER).checked_add(len).and_then(|end| bytes.get(off + HEADER..end)) else {
            continue;
        };
        let (decoded, cost) = match count_entries(payload) {
            Ok(n) => (true, n as u64 * ENTRY_COST + len as u64),
            Err(n) => (false, (n as u64 + 1) * ENTRY_COST),
        };
        let Some(left) = budget.checked_sub(cost) else { return Resync::GaveUp };
        budget = left;
        if decoded && frame_at(bytes, off).is_some() {
            return Resync::At(off);
        }
    }
    Resync::End
}

/// Whether all of `payload` decodes as entries: `Ok` with the number of
/// entries, else `Err` with the number decoded before one did not. Looking
/// for the next frame after damage asks this before checksumming a
/// candidate: sample records are full of small numbers, so about one
/// offset in five reads as a plausible frame length (a damaged header in a
/// 2 MB commit of 10,000 VMs left ~400 GB to checksum before the next
/// frame); almost none of those payloads decode past a few entries.
fn count_entries(payload: &[u8]) -> Result<usize, usize> {
    let mut b = payload;
    let mut n = 0;
    while !b.is_empty() {
        if next_entry(&mut b).is_none() {
            return Err(n);
        }
        n += 1;
    }
    Ok(n)
}
