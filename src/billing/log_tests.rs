//! Tests of the spool log: id slots, replay of chunks, deletions, skips
//! and meters, torn tails and damage (skipped, its VMs reported; found
//! again in commits of real records at scale; a spent search budget),
//! segment collection and compaction.

#![allow(clippy::unwrap_used)]

use super::*;
use std::path::{Path, PathBuf};

fn head(id: i64, vm: &str) -> ChunkHead<&str> {
    ChunkHead {
        id,
        vm,
        customer: "cust",
        records: 2,
        events: 0,
        first_ts: 10 * id,
        last_ts: 10 * id + 5,
        skip: 0,
        thinned: false,
    }
}

fn frame_with(log: &mut Log, chunks: &[(&str, &[u8])]) -> Vec<i64> {
    let mut f = Frame::new();
    if log.needs_checkpoint() {
        f.checkpoint(log.peek_next_id());
    }
    let ids: Vec<i64> = chunks
        .iter()
        .map(|(vm, data)| {
            let id = log.next_id();
            f.chunk(&head(id, vm), |b| b.extend_from_slice(data));
            id
        })
        .collect();
    log.append(f).unwrap();
    ids
}

#[test]
fn locs_are_a_sliding_window() {
    let loc = |seg| Loc { seg, off: 0, len: 0, data_off: 0, skip: 0 };
    let mut l = Locs::default();
    assert!(l.insert(5, loc(1)).is_none());
    assert!(l.insert(7, loc(1)).is_none());
    assert_eq!(l.insert(5, loc(2)).map(|o| o.seg), Some(1));
    assert!(l.insert(3, loc(3)).is_none());
    assert_eq!(l.iter().count(), 3);
    assert_eq!(l.remove(&3).map(|o| o.seg), Some(3));
    assert!(l.remove(&3).is_none() && l.get(&4).is_none() && l.get(&100).is_none());
    assert_eq!(l.base, 5, "dead ids at the front are dropped");
    assert_eq!(l.iter().map(|(id, o)| (id, o.seg)).collect::<Vec<_>>(), vec![(5, 2), (7, 1)]);
    l.get_mut(&7).unwrap().skip = 4;
    assert_eq!(l.get(&7).unwrap().skip, 4);
    l.remove(&5);
    l.remove(&7);
    assert!(l.slots.is_empty());
}

#[test]
fn chunks_deletes_skips_and_meters_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, rec) = Log::open(tmp.path()).unwrap();
    assert!(rec.chunks.is_empty() && log.needs_checkpoint());
    let ids = frame_with(&mut log, &[("a", b"one"), ("b", b"two")]);
    let mut f = Frame::new();
    f.meter("a", "cust", 15);
    f.meter("b", "cust", 25);
    f.unmeter("b");
    f.touch("a", 16);
    f.delete(ids[1]);
    f.skip(ids[0], 1);
    log.append(f).unwrap();
    let r = log.reader();
    assert_eq!(r.read(&ids).unwrap(), vec![Some(b"one".to_vec()), None]);
    drop(log);
    let (mut log, rec) = Log::open(tmp.path()).unwrap();
    assert_eq!(rec.chunks.keys().copied().collect::<Vec<_>>(), vec![ids[0]]);
    let c = &rec.chunks[&ids[0]];
    assert_eq!((c.head.vm.as_str(), c.head.skip, c.bytes), ("a", 1, 3));
    assert_eq!(rec.meter.len(), 1);
    assert_eq!(rec.meter["a"], ("cust".to_string(), 16));
    assert_eq!(log.reader().read(&ids[..1]).unwrap(), vec![Some(b"one".to_vec())]);
    // Ids keep growing across a restart.
    assert!(log.next_id() > ids[1]);
}

#[test]
fn a_torn_tail_is_cut_off_and_appends_continue() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(tmp.path()).unwrap();
    let ids = frame_with(&mut log, &[("a", b"kept")]);
    frame_with(&mut log, &[("a", b"torn")]);
    drop(log);
    let seg = seg_path(tmp.path(), 1);
    let len = std::fs::metadata(&seg).unwrap().len();
    OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 2).unwrap();
    let (mut log, rec) = Log::open(tmp.path()).unwrap();
    assert_eq!(rec.chunks.keys().copied().collect::<Vec<_>>(), ids);
    let more = frame_with(&mut log, &[("a", b"after")]);
    drop(log);
    let (log, rec) = Log::open(tmp.path()).unwrap();
    assert_eq!(rec.chunks.len(), 2);
    assert_eq!(log.reader().read(&more).unwrap(), vec![Some(b"after".to_vec())]);
    // A flipped bit fails the checksum: the frame is not replayed.
    drop(log);
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&seg, bytes).unwrap();
    let (_, rec) = Log::open(tmp.path()).unwrap();
    assert_eq!(rec.chunks.keys().copied().collect::<Vec<_>>(), ids);
}

#[test]
fn spent_segments_go_and_stragglers_are_copied_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open_with(tmp.path(), 64 << 10).unwrap();
    let straggler = frame_with(&mut log, &[("slow", b"old data")])[0];
    let big = vec![7u8; 16 << 10];
    let mut gone = Vec::new();
    // Fill segments with chunks that are then acknowledged.
    while log.segments() < 8 {
        if log.should_roll() {
            log.roll().unwrap();
        }
        gone.extend(frame_with(&mut log, &[("fast", &big)]));
    }
    let mut f = Frame::new();
    for id in &gone {
        f.delete(*id);
    }
    log.append(f).unwrap();
    log.collect();
    // The straggler pins the first segment, and with it the rest.
    assert_eq!(log.segments(), 8);
    let mut f = Frame::new();
    assert_eq!(log.compact_into(&mut f).unwrap(), 1);
    log.append(f).unwrap();
    log.collect();
    assert_eq!(log.segments(), 1, "only the current segment is left");
    assert_eq!(log.reader().read(&[straggler]).unwrap(), vec![Some(b"old data".to_vec())]);
    drop(log);
    let (log, rec) = Log::open(tmp.path()).unwrap();
    assert_eq!(rec.chunks.keys().copied().collect::<Vec<_>>(), vec![straggler]);
    assert_eq!(rec.chunks[&straggler].head.vm, "slow");
    assert_eq!(log.reader().read(&[straggler]).unwrap(), vec![Some(b"old data".to_vec())]);
}

/// Frames of one chunk each for `vm` a, b, a, c, ... with meters; returns
/// the segment path, each frame's (offset, length) and the chunk ids.
fn five_frames(dir: &Path) -> (PathBuf, Vec<(usize, usize)>, Vec<i64>) {
    let (mut log, _) = Log::open(dir).unwrap();
    let seg = seg_path(dir, 1);
    let mut frames = Vec::new();
    let mut ids = Vec::new();
    for (k, vm) in ["a", "b", "a", "c", "a"].iter().enumerate() {
        let start = usize::try_from(std::fs::metadata(&seg).unwrap().len()).unwrap();
        let mut f = Frame::new();
        if log.needs_checkpoint() {
            f.checkpoint(log.peek_next_id());
        }
        if k == 0 {
            f.meter("a", "cust", 1);
            f.meter("b", "cust", 1);
        }
        if k == 3 {
            f.meter("c", "cust-c", 30);
        }
        let id = log.next_id();
        f.chunk(&head(id, vm), |b| b.extend_from_slice(format!("records of frame {k}").as_bytes()));
        log.append(f).unwrap();
        let end = usize::try_from(std::fs::metadata(&seg).unwrap().len()).unwrap();
        frames.push((start, end - start));
        ids.push(id);
    }
    (seg, frames, ids)
}

#[test]
fn damage_in_a_payload_skips_that_frame_only_and_reports_the_vms() {
    let tmp = tempfile::tempdir().unwrap();
    let (seg, frames, ids) = five_frames(tmp.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    // A flipped byte inside frame 1's payload (b's chunk).
    bytes[frames[1].0 + HEADER + 3] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    let (log, rec) = Log::open(tmp.path()).unwrap();
    let mut want = ids.clone();
    want.remove(1);
    assert_eq!(rec.chunks.keys().copied().collect::<Vec<_>>(), want, "later frames are replayed");
    assert_eq!(rec.corrupt_frames, 1);
    // Metered at the damage: a and b; c appears after it.
    assert_eq!(rec.gaps.keys().map(String::as_str).collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(rec.gaps["c"].0, "cust-c");
    assert!(rec.gaps.values().all(|(_, from)| *from <= rec.latest_ts));
    assert_eq!(log.reader().read(&ids[4..]).unwrap(), vec![Some(b"records of frame 4".to_vec())]);
    assert_eq!(std::fs::read(&seg).unwrap().len(), bytes.len(), "damage is not cut off like a torn tail");
}

#[test]
fn a_damaged_header_is_resynchronised_by_scanning() {
    let tmp = tempfile::tempdir().unwrap();
    let (seg, frames, ids) = five_frames(tmp.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    // Frame 2's length field: the frame after it is found by scanning.
    bytes[frames[2].0 + 1] ^= 0x5a;
    std::fs::write(&seg, &bytes).unwrap();
    let (_, rec) = Log::open(tmp.path()).unwrap();
    assert_eq!(rec.chunks.keys().copied().collect::<Vec<_>>(), [ids[0], ids[1], ids[3], ids[4]]);
    assert_eq!(rec.corrupt_frames, 1);
    assert!(rec.gaps.contains_key("a") && rec.gaps.contains_key("b"));
}

#[test]
fn a_torn_tail_is_not_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let (seg, frames, ids) = five_frames(tmp.path());
    let (start, len) = frames[4];
    OpenOptions::new().write(true).open(&seg).unwrap().set_len(u64::try_from(start + len - 3).unwrap()).unwrap();
    let (_, rec) = Log::open(tmp.path()).unwrap();
    assert_eq!(rec.chunks.keys().copied().collect::<Vec<_>>(), ids[..4]);
    assert_eq!(rec.corrupt_frames, 0);
    assert!(rec.gaps.is_empty());
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), u64::try_from(start).unwrap(), "cut off");
}

/// Frames the size of a commit at scale: `vms` VMs of 10 real samples
/// each (delta-encoded records, as the writer spools them).
fn big_frames(dir: &Path, frames: usize, vms: usize) -> (PathBuf, Vec<(usize, usize)>, Vec<Vec<i64>>) {
    use crate::billing::codec::Record;
    use crate::model::Usage;
    let (mut log, _) = Log::open(dir).unwrap();
    let seg = seg_path(dir, 1);
    let names: Vec<String> = (0..vms).map(|v| format!("vm-{v:05}")).collect();
    let mut out = Vec::new();
    let mut ids = Vec::new();
    for k in 0..frames {
        let start = usize::try_from(std::fs::metadata(&seg).unwrap().len()).unwrap();
        let mut f = Frame::new();
        if log.needs_checkpoint() {
            f.checkpoint(log.peek_next_id());
            for n in &names {
                f.meter(n, "cust", 1);
            }
        }
        let mut fid = Vec::new();
        for (v, n) in names.iter().enumerate() {
            let id = log.next_id();
            let base = 1_700_000_000_000_000_000 + i64::try_from(k * 10).unwrap() * 100_000_000;
            let recs: Vec<Record> = (0..10u64)
                .map(|s| {
                    let t = u64::try_from(k).unwrap() * 10 + s;
                    let u = Usage {
                        cpu_time_ns: t * (3_000_000 + v as u64 * 7919),
                        memory_bytes: 256 << 20,
                        disk_read_bytes: t / 3 * 4096,
                        net_rx_bytes: t * (v as u64 % 13) * 60,
                        ..Usage::default()
                    };
                    Record::sample(
                        base + i64::try_from(s).unwrap() * 100_000_000 + i64::try_from(v % 97).unwrap() * 1000,
                        &u,
                    )
                })
                .collect();
            let h = ChunkHead {
                id,
                vm: n.as_str(),
                customer: "cust",
                records: 10,
                events: 0,
                first_ts: recs[0].ts_ns,
                last_ts: recs[9].ts_ns,
                skip: 0,
                thinned: false,
            };
            f.chunk(&h, |b| Record::encode_into(&recs, b));
            fid.push(id);
        }
        log.append(f).unwrap();
        let end = usize::try_from(std::fs::metadata(&seg).unwrap().len()).unwrap();
        out.push((start, end - start));
        ids.push(fid);
    }
    (seg, out, ids)
}

#[test]
fn a_damaged_header_in_commits_at_scale_is_resynchronised() {
    // Real sample records are full of small numbers: about one offset in
    // five reads as a plausible frame length. Checksumming each candidate
    // ran out of search budget long before the next frame, and the rest of
    // the segment was cut off as if torn.
    let tmp = tempfile::tempdir().unwrap();
    let (seg, frames, ids) = big_frames(tmp.path(), 4, 2_000);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[frames[1].0 + 2] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let (_, rec) = Log::open(tmp.path()).unwrap();
    let want: Vec<i64> = [&ids[0], &ids[2], &ids[3]].into_iter().flatten().copied().collect();
    assert_eq!(rec.chunks.len(), want.len(), "later frames are replayed");
    assert!(rec.chunks.keys().copied().eq(want));
    assert_eq!(rec.corrupt_frames, 1);
    assert_eq!(rec.gaps.len(), 2_000, "every VM metered at the damage");
    assert_eq!(std::fs::read(&seg).unwrap().len(), bytes.len());
}

#[test]
fn a_spent_search_budget_is_damage_not_a_torn_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let (seg, frames, ids) = five_frames(tmp.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[frames[2].0 + 1] ^= 0x5a;
    std::fs::write(&seg, &bytes).unwrap();
    let (mut log, rec) = Log::open_budget(tmp.path(), SEGMENT_BYTES, 0).unwrap();
    assert_eq!(rec.chunks.keys().copied().collect::<Vec<_>>(), ids[..2]);
    assert_eq!(rec.corrupt_frames, 1);
    assert_eq!(rec.gaps.keys().map(String::as_str).collect::<Vec<_>>(), ["a", "b"]);
    // The unread rest is set aside, and appends go on after what was read.
    let aside = tmp.path().join(format!("{}.damaged-{}", seg.file_name().unwrap().to_str().unwrap(), frames[2].0));
    assert_eq!(std::fs::read(aside).unwrap(), bytes[frames[2].0..]);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), u64::try_from(frames[2].0).unwrap());
    let more = frame_with(&mut log, &[("a", b"after")]);
    drop(log);
    let (log, rec) = Log::open(tmp.path()).unwrap();
    assert_eq!(rec.chunks.keys().copied().collect::<Vec<_>>(), [ids[0], ids[1], more[0]]);
    assert_eq!(rec.corrupt_frames, 0, "the damage was dealt with");
    assert_eq!(log.reader().read(&more).unwrap(), vec![Some(b"after".to_vec())]);
}

#[test]
fn resync_finds_the_next_frame_or_says_why_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (seg, frames, _) = five_frames(tmp.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    // Payload damage: the bad frame's own length points at the next one.
    bytes[frames[1].0 + HEADER + 2] ^= 1;
    assert_eq!(resync(&bytes, frames[1].0, 0), Resync::At(frames[2].0));
    // Header damage: found by scanning, given budget.
    bytes[frames[3].0] ^= 0x40;
    assert_eq!(resync(&bytes, frames[3].0, RESYNC_BUDGET), Resync::At(frames[4].0));
    assert_eq!(resync(&bytes, frames[3].0, 0), Resync::GaveUp);
    // Nothing valid after the last frame.
    bytes[frames[4].0 + HEADER] ^= 1;
    assert_eq!(resync(&bytes, frames[4].0, RESYNC_BUDGET), Resync::End);
}

#[test]
fn a_growing_segment_is_mapped_afresh_every_remap_bytes() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("seg");
    let mut f = File::create(&path).unwrap();
    f.write_all(&vec![7u8; 4096]).unwrap();
    let seg = SegFile::new(File::open(&path).unwrap(), 4 * REMAP_BYTES);
    let first = seg.view(4096).unwrap();
    // Growth within REMAP_BYTES of the map reads through the same map.
    f.write_all(&vec![8u8; usize::try_from(REMAP_BYTES).unwrap() / 2]).unwrap();
    let same = seg.view(4096 + REMAP_BYTES / 2).unwrap();
    assert!(Arc::ptr_eq(&first, &same));
    assert_eq!(same[4096 + usize::try_from(REMAP_BYTES).unwrap() / 2 - 1], 8);
    // Past it, a new map (the old one's pages leave the RSS with it).
    f.write_all(&vec![9u8; usize::try_from(REMAP_BYTES).unwrap()]).unwrap();
    let end = 4096 + 3 * REMAP_BYTES / 2;
    let fresh = seg.view(end).unwrap();
    assert!(!Arc::ptr_eq(&first, &fresh));
    assert_eq!(fresh[usize::try_from(end).unwrap() - 1], 9);
}
