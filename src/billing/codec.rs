//! The spool's record codec: what a spooled [`Record`] is (a sample or a
//! start/stop/gap notice of one VM), the delta encoding of a chunk's records
//! ([`Record::encode_all`]: zigzag varints of the differences from the
//! previous record), the LEB128 varints and zigzag mapping the log's frames
//! use too, and thinning ([`thin`]). A leaf: it imports nothing of billing.

use crate::model::Usage;

/// What a spooled record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sample,
    Started,
    Stopped,
    /// `v[0]` holds `last_sent`, `ts_ns` the resume time.
    Gap,
}

impl Kind {
    fn code(self) -> i64 {
        match self {
            Kind::Sample => 0,
            Kind::Started => 1,
            Kind::Stopped => 2,
            Kind::Gap => 3,
        }
    }

    fn from_code(c: i64) -> Option<Kind> {
        match c {
            0 => Some(Kind::Sample),
            1 => Some(Kind::Started),
            2 => Some(Kind::Stopped),
            3 => Some(Kind::Gap),
            _ => None,
        }
    }
}

/// One sample or notice of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    /// Unix nanoseconds.
    pub ts_ns: i64,
    /// Sample: cpu ns, memory, disk read, disk write, net rx, net tx.
    pub v: [i64; 6],
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Record {
    pub fn sample(ts_ns: i64, u: &Usage) -> Record {
        Record {
            kind: Kind::Sample,
            ts_ns,
            v: [
                i(u.cpu_time_ns),
                i(u.memory_bytes),
                i(u.disk_read_bytes),
                i(u.disk_write_bytes),
                i(u.net_rx_bytes),
                i(u.net_tx_bytes),
            ],
        }
    }

    pub fn notice(kind: Kind, ts_ns: i64) -> Record {
        Record { kind, ts_ns, v: [0; 6] }
    }

    pub fn gap(last_sent: i64, resume: i64) -> Record {
        Record { kind: Kind::Gap, ts_ns: resume, v: [last_sent, 0, 0, 0, 0, 0] }
    }

    /// Encodes records for a chunk blob: a format byte, the count, then per
    /// record its kind and the zigzag-varint differences of its time and
    /// six counters from the previous record's. Cumulative counters move
    /// little between 100 ms samples, so a sample takes ~12 bytes instead of
    /// 64 — the spool's write volume, and with it most of its CPU, shrinks
    /// by about five. (Hand-written: a dozen lines over prost's varints; a
    /// general codec would not know to take differences.)
    pub fn encode_all(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + records.len() * 16);
        Record::encode_into(records, &mut out);
        out
    }

    /// [`Record::encode_all`], appended to `out`.
    pub fn encode_into(records: &[Record], out: &mut Vec<u8>) {
        out.push(FORMAT_DELTA);
        put_varint(records.len() as u64, out);
        let mut prev = Prev::default();
        for r in records {
            r.encode_after(&mut prev, out);
        }
    }

    /// Appends this record's kind and its differences from `prev` (the
    /// previous record of the blob; zeros before the first), then makes it
    /// the previous one.
    #[inline]
    pub(super) fn encode_after(&self, prev: &mut Prev, out: &mut Vec<u8>) {
        out.push(self.kind.code().to_le_bytes()[0]);
        put_varint(zigzag(self.ts_ns.wrapping_sub(prev.0)), out);
        for (x, p) in self.v.iter().zip(prev.1) {
            put_varint(zigzag(x.wrapping_sub(p)), out);
        }
        *prev = (self.ts_ns, self.v);
    }

    /// Decodes a chunk blob (`None`: corrupt).
    pub fn decode_all(b: &[u8]) -> Option<Vec<Record>> {
        let mut out = Vec::new();
        Record::decode_into(b, 0, &mut out)?;
        Some(out)
    }

    /// Decodes a chunk blob, appending its records after the first `skip`
    /// to `out` (`None`: corrupt; `out` may then hold part of the chunk).
    pub fn decode_into(b: &[u8], skip: usize, out: &mut Vec<Record>) -> Option<()> {
        match b.split_first() {
            Some((&FORMAT_DELTA, rest)) => decode_delta(rest, skip, out),
            _ => None,
        }
    }
}

/// The previous record's time and counters while delta-encoding.
pub(super) type Prev = (i64, [i64; 6]);

/// First byte of a chunk blob (the delta format).
pub(super) const FORMAT_DELTA: u8 = 0x81;

/// LEB128, as protobuf and prost write it; inlined here because it runs
/// 700,000 times a second at 10,000 VMs (prost's `decode_varint` reads it).
#[inline]
pub(super) fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v.to_le_bytes()[0] | 0x80);
        v >>= 7;
    }
    out.push(v.to_le_bytes()[0]);
}

// Zigzag maps small negative and positive differences to small unsigned
// numbers; the casts reinterpret bits on purpose.
#[allow(clippy::cast_sign_loss)]
pub(super) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[allow(clippy::cast_possible_wrap)]
pub(super) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn decode_delta(mut b: &[u8], skip: usize, out: &mut Vec<Record>) -> Option<()> {
    use prost::encoding::decode_varint;
    let n = usize::try_from(decode_varint(&mut b).ok()?).ok()?;
    // Each record takes at least 8 bytes: a lying count cannot allocate much.
    out.reserve(n.saturating_sub(skip).min(b.len() / 8));
    let mut prev = (0i64, [0i64; 6]);
    for k in 0..n {
        let (&kind, rest) = b.split_first()?;
        b = rest;
        let kind = Kind::from_code(i64::from(kind))?;
        let ts_ns = prev.0.wrapping_add(unzigzag(decode_varint(&mut b).ok()?));
        let mut v = [0i64; 6];
        for (x, p) in v.iter_mut().zip(prev.1) {
            *x = p.wrapping_add(unzigzag(decode_varint(&mut b).ok()?));
        }
        prev = (ts_ns, v);
        if k >= skip {
            out.push(Record { kind, ts_ns, v });
        }
    }
    b.is_empty().then_some(())
}

/// Keeps every notice and the first and last sample of each run of samples;
/// a gap notice follows each thinned run's first sample. Returns the new
/// records and how many samples were removed.
pub fn thin(records: &[Record]) -> (Vec<Record>, u64) {
    let mut out = Vec::new();
    let mut removed = 0u64;
    let mut k = 0;
    while k < records.len() {
        if records[k].kind != Kind::Sample {
            out.push(records[k]);
            k += 1;
            continue;
        }
        let start = k;
        while k < records.len() && records[k].kind == Kind::Sample {
            k += 1;
        }
        let run = &records[start..k];
        if let [first, .., last] = run
            && run.len() > 2
        {
            removed += u64::try_from(run.len() - 2).unwrap_or(0);
            out.extend([*first, Record::gap(first.ts_ns, last.ts_ns), *last]);
            continue;
        }
        out.extend_from_slice(run);
    }
    (out, removed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn s(ts: i64, cpu: i64) -> Record {
        Record { kind: Kind::Sample, ts_ns: ts, v: [cpu, 1, 2, 3, 4, 5] }
    }

    #[test]
    fn varints_match_prost() {
        for v in [0u64, 1, 127, 128, 300, 16_383, 16_384, u64::from(u32::MAX), u64::MAX - 1, u64::MAX] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            put_varint(v, &mut ours);
            prost::encoding::encode_varint(v, &mut theirs);
            assert_eq!(ours, theirs, "{v}");
        }
    }

    #[test]
    fn records_round_trip() {
        let rs = vec![
            s(1, 10),
            Record::notice(Kind::Started, 2),
            Record::gap(3, 4),
            s(5, -1),
            s(i64::MAX, i64::MIN),
            s(i64::MIN, i64::MAX),
        ];
        let blob = Record::encode_all(&rs);
        assert_eq!(Record::decode_all(&blob).unwrap(), rs);
        assert_eq!(Record::decode_all(&Record::encode_all(&[])).unwrap(), vec![]);
        // Appending after what is there, without the first `skip` records.
        let mut out = vec![s(0, 0)];
        Record::decode_into(&blob, 4, &mut out).unwrap();
        assert_eq!(out, [&[s(0, 0)], &rs[4..]].concat());
        // Truncated, padded or lying about its count: corrupt, not garbage.
        assert!(Record::decode_all(&blob[..blob.len() - 1]).is_none());
        assert!(Record::decode_all(&[blob.as_slice(), &[0]].concat()).is_none());
        assert!(Record::decode_all(&[FORMAT_DELTA, 200]).is_none());
        assert!(Record::decode_all(&[0u8; 63]).is_none());
    }

    /// Ten 100 ms samples of a VM take ~12 bytes each, not 64.
    #[test]
    fn delta_format_is_compact() {
        let rs: Vec<Record> = (0..10)
            .map(|k| Record {
                kind: Kind::Sample,
                ts_ns: 1_764_000_000_000_000_000 + k * 100_000_123,
                v: [k * 9_876_543, 256 << 20, k * 4096, k * 1024, k * 1500, k * 500],
            })
            .collect();
        let n = Record::encode_all(&rs).len();
        assert!(n < 10 * 20, "{n} bytes");
    }

    /// Cumulative counters can go down: a managed NIC's TAP found missing
    /// at metald's start is made again and counts from 0 (its VM's metering
    /// resumes after a gap notice). The differences are signed (zigzag), so
    /// a decrease is carried exactly and costs a few bytes once; thinning
    /// never spans it, because a gap notice ends a run of samples.
    #[test]
    fn counters_that_go_back_to_zero_are_carried_exactly() {
        let gb = 1i64 << 30;
        let net = |ts: i64, rx: i64, tx: i64| Record { kind: Kind::Sample, ts_ns: ts, v: [ts * 10, 1, 2, 3, rx, tx] };
        let mut rs: Vec<Record> = (0..5).map(|k| net(k, 40 * gb + k * 1500, 7 * gb + k * 500)).collect();
        rs.push(Record::gap(4, 10));
        rs.extend((10..15).map(|k| net(k, (k - 10) * 1500, (k - 10) * 500)));
        let blob = Record::encode_all(&rs);
        assert_eq!(Record::decode_all(&blob).unwrap(), rs);
        assert!(blob.len() < rs.len() * 20, "{} bytes", blob.len());
        let (kept, _) = thin(&rs);
        assert!(kept.contains(&net(10, 0, 0)), "the first sample after the reset is kept: {kept:?}");
        assert!(kept.contains(&net(4, 40 * gb + 6000, 7 * gb + 2000)), "the last one before it too");
    }

    #[test]
    fn thinning_keeps_first_and_last_of_each_run() {
        let stop = Record::notice(Kind::Stopped, 50);
        let rs: Vec<Record> = (0..10).map(|k| s(k, k * 100)).chain([stop]).chain((60..62).map(|k| s(k, k))).collect();
        let (kept, removed) = thin(&rs);
        assert_eq!(removed, 8);
        assert_eq!(kept, vec![s(0, 0), Record::gap(0, 9), s(9, 900), stop, s(60, 60), s(61, 61)]);
        // Thinning again removes nothing more.
        assert_eq!(thin(&kept).1, 0);
    }
}
