//! One-line-per-event logging to stderr, filtered by `GATELET_LOG`.

use std::sync::atomic::{AtomicU8, Ordering};

/// Severity, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Something failed.
    Error = 1,
    /// Something is off but work goes on.
    Warn = 2,
    /// Lifecycle events.
    Info = 3,
    /// Per-request detail.
    Debug = 4,
    /// Everything.
    Trace = 5,
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

/// Set the level from `GATELET_LOG` (default `info`). Unknown values keep `info` and warn.
pub fn init_from_env() {
    let v = std::env::var("GATELET_LOG").unwrap_or_default();
    let l = match v.to_ascii_lowercase().as_str() {
        "" | "info" => Level::Info,
        "error" => Level::Error,
        "warn" => Level::Warn,
        "debug" => Level::Debug,
        "trace" => Level::Trace,
        other => {
            eprintln!("gatelet: warn: GATELET_LOG={other:?} is not error/warn/info/debug/trace; using info");
            Level::Info
        }
    };
    LEVEL.store(l as u8, Ordering::Relaxed);
}

/// Whether `l` is logged.
pub fn enabled(l: Level) -> bool {
    l as u8 <= LEVEL.load(Ordering::Relaxed)
}

/// Write one line.
pub fn write(l: Level, args: std::fmt::Arguments<'_>) {
    let name = match l {
        Level::Error => "error",
        Level::Warn => "warn",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    };
    eprintln!("gatelet: {name}: {args}");
}

/// Log at a level: `log!(Info, "listening on {addr}")`.
#[macro_export]
macro_rules! log {
    ($lvl:ident, $($arg:tt)*) => {
        if $crate::log::enabled($crate::log::Level::$lvl) {
            $crate::log::write($crate::log::Level::$lvl, format_args!($($arg)*));
        }
    };
}
