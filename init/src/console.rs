//! The lines metald-init prints on the serial console for metald to parse (docs/IMAGES.md,
//! "Guest init"): each a whole line written at once, so it never interleaves with a
//! workload's output mid-line.

use std::io::Write;

/// Writes `line` and a newline to the console (stdout, which is `/dev/console`) in one write.
pub fn marker(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{line}\n").as_bytes());
    let _ = out.flush();
}
