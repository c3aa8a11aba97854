//! Process and runtime metrics of the daemon itself (the Rust counterpart of
//! the spec's `go_*` metrics), read from `/proc/self` at each collection and
//! named after Prometheus' `process_*` conventions: `process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
//! `process_open_fds`, `process_max_fds`, `process_threads`,
//! `process_start_time_seconds`, plus `tokio_*` runtime gauges.

use opentelemetry::metrics::{AsyncInstrument, Meter, ObservableCounter, ObservableGauge};

/// One reading of `/proc/self`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcStat {
    pub cpu_seconds: f64,
    pub threads: u64,
    pub start_time_seconds: f64,
    pub virtual_bytes: u64,
    pub resident_bytes: u64,
}

struct SysInfo {
    ticks_per_sec: f64,
    page_size: u64,
    boot_time: f64,
}

fn sys_info() -> SysInfo {
    use nix::unistd::{SysconfVar, sysconf};
    let ticks = sysconf(SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100);
    let page = sysconf(SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096);
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<f64>().ok())))
        .unwrap_or(0.0);
    SysInfo { ticks_per_sec: ticks as f64, page_size: u64::try_from(page).unwrap_or(4096), boot_time }
}

/// Parses `/proc/<pid>/stat` (the command may contain spaces and parens,
/// so fields are counted after the last `)`).
pub fn parse_stat(text: &str, ticks_per_sec: f64, page_size: u64, boot_time: f64) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    // Fields after the command, starting at field 3 (state).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let (utime, stime) = (field(14)?, field(15)?);
    Some(ProcStat {
        cpu_seconds: (utime + stime) as f64 / ticks_per_sec,
        threads: field(20)?,
        start_time_seconds: boot_time + field(22)? as f64 / ticks_per_sec,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)?.saturating_mul(page_size),
    })
}

fn read_stat(sys: &SysInfo) -> Option<ProcStat> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat(&text, sys.ticks_per_sec, sys.page_size, sys.boot_time)
}

fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

fn max_fds() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Keeps the registered callbacks alive.
pub struct ProcessMetrics {
    _cpu: ObservableCounter<f64>,
    _gauges: Vec<ObservableGauge<u64>>,
    _start: ObservableGauge<f64>,
}

/// Registers the process metrics, and tokio runtime gauges for `rt`.
pub fn register(meter: &Meter, rt: Option<tokio::runtime::Handle>) -> ProcessMetrics {
    let sys = std::sync::Arc::new(sys_info());
    let s = sys.clone();
    let cpu = meter
        .f64_observable_counter("process_cpu")
        .with_unit("s")
        .with_description("Total user and system CPU time spent in seconds")
        .with_callback(move |o| {
            if let Some(st) = read_stat(&s) {
                o.observe(st.cpu_seconds, &[]);
            }
        })
        .build();
    let s = sys.clone();
    let start = meter
        .f64_observable_gauge("process_start_time")
        .with_unit("s")
        .with_description("Start time of the process since unix epoch in seconds")
        .with_callback(move |o| {
            if let Some(st) = read_stat(&s) {
                o.observe(st.start_time_seconds, &[]);
            }
        })
        .build();
    let mut gauges = Vec::new();
    let mut gauge =
        |name: &'static str, unit: &'static str, help: &'static str, f: Box<dyn Fn() -> Option<u64> + Send + Sync>| {
            let mut b = meter.u64_observable_gauge(name).with_description(help);
            if !unit.is_empty() {
                b = b.with_unit(unit);
            }
            gauges.push(
                b.with_callback(move |o: &dyn AsyncInstrument<u64>| {
                    if let Some(v) = f() {
                        o.observe(v, &[]);
                    }
                })
                .build(),
            );
        };
    let s = sys.clone();
    gauge(
        "process_resident_memory",
        "By",
        "Resident memory size in bytes",
        Box::new(move || read_stat(&s).map(|st| st.resident_bytes)),
    );
    let s = sys.clone();
    gauge(
        "process_virtual_memory",
        "By",
        "Virtual memory size in bytes",
        Box::new(move || read_stat(&s).map(|st| st.virtual_bytes)),
    );
    let s = sys;
    gauge(
        "process_threads",
        "",
        "Number of OS threads in the process",
        Box::new(move || read_stat(&s).map(|st| st.threads)),
    );
    gauge("process_open_fds", "", "Number of open file descriptors", Box::new(open_fds));
    gauge("process_max_fds", "", "Maximum number of open file descriptors", Box::new(max_fds));
    if let Some(rt) = rt {
        let m = rt.metrics();
        let m2 = m.clone();
        let m3 = m.clone();
        gauge(
            "tokio_workers",
            "",
            "Worker threads of the tokio runtime",
            Box::new(move || Some(m.num_workers() as u64)),
        );
        gauge(
            "tokio_alive_tasks",
            "",
            "Tasks alive in the tokio runtime",
            Box::new(move || Some(m2.num_alive_tasks() as u64)),
        );
        gauge(
            "tokio_global_queue_depth",
            "",
            "Tasks waiting in the tokio runtime's global queue",
            Box::new(move || Some(m3.global_queue_depth() as u64)),
        );
    }
    ProcessMetrics { _cpu: cpu, _gauges: gauges, _start: start }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1000 123456789 300 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let st = parse_stat(line, 100.0, 4096, 1_700_000_000.0).unwrap();
        assert_eq!(st.cpu_seconds, 3.0);
        assert_eq!(st.threads, 7);
        assert_eq!(st.start_time_seconds, 1_700_000_010.0);
        assert_eq!(st.virtual_bytes, 123_456_789);
        assert_eq!(st.resident_bytes, 300 * 4096);
    }

    #[test]
    fn reads_this_process() {
        let st = read_stat(&sys_info()).unwrap();
        assert!(st.threads >= 1 && st.resident_bytes > 0 && st.start_time_seconds > 1e9);
        assert!(open_fds().unwrap() > 0);
        assert!(max_fds().unwrap() > 0);
    }
}
