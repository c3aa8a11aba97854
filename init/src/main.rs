//! The `metald-init` binary: PID 1 of image guests (see the library's docs). It never exits —
//! an init that returns panics the kernel — so every error, and a panic, ends in a report on
//! the console and a power-off.

fn main() {
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
