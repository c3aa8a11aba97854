//! Process and runtime metrics of the daemon itself (the Rust counterpart of
//! the spec's `go_*` metrics), read from `/proc/self` at each collection and
//! named after Prometheus' `process_*` conventions: `process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
//! `process_open_fds`, `process_max_fds`, `process_threads`,
//! `process_start_time_seconds`, plus `tokio_*` runtime gauges.

use opentelemetry::metrics::{AsyncInstrument, Meter, ObservableCounter, ObservableGauge};

use crate::procfs::{self, Stat};

/// One reading of `/proc/self`, in the units of the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessSample {
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
    SysInfo {
        ticks_per_sec: procfs::clk_tck() as f64,
        page_size: procfs::page_size(),
        boot_time: procfs::boot_time_secs().unwrap_or(0) as f64,
    }
}

/// Converts a `/proc/<pid>/stat` reading into the metrics' units.
fn convert(st: &Stat, sys: &SysInfo) -> ProcessSample {
    ProcessSample {
        cpu_seconds: (st.utime + st.stime) as f64 / sys.ticks_per_sec,
        threads: st.threads,
        start_time_seconds: sys.boot_time + st.start_ticks as f64 / sys.ticks_per_sec,
        virtual_bytes: st.vsize_bytes,
        resident_bytes: st.rss_pages.saturating_mul(sys.page_size),
    }
}

fn read_stat(sys: &SysInfo) -> Option<ProcessSample> {
    procfs::read_self_stat().ok().map(|st| convert(&st, sys))
}

fn open_fds() -> Option<u64> {
    procfs::open_fds()
}

fn max_fds() -> Option<u64> {
    procfs::max_fds()
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
        let sys = SysInfo { ticks_per_sec: 100.0, page_size: 4096, boot_time: 1_700_000_000.0 };
        let st = convert(&procfs::parse_stat(line).unwrap(), &sys);
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
