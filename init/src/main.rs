//! The `metald-init` binary: PID 1 of image guests (see the library's docs). It never exits —
//! an init that returns panics the kernel — so every error, and a panic, ends in a report on
//! the console and a power-off. `metald-init generation` runs only the generation watcher
//! (`generation.rs`), for the test guest's busybox init.

fn main() {
    if std::env::args().nth(1).as_deref() == Some("generation") {
        match metald_init::generation::watch(std::path::Path::new("/sys")) {
            Ok(_) => std::process::exit(0),
            Err(e) => {
                metald_init::console::marker(&format!("METALD_RESEED_FAILED {e}"));
                std::process::exit(1)
            }
        }
    }
    if std::process::id() != 1 {
        eprintln!("metald-init: must run as PID 1 (boot a guest with rdinit=/metald-init)");
        std::process::exit(2);
    }
    std::panic::set_hook(Box::new(|info| metald_init::supervise::fatal(&format!("panic: {info}"))));
    match metald_init::run() {
        Ok(never) => match never {},
        Err(e) => metald_init::supervise::fatal(&e.to_string()),
    }
}
