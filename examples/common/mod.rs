//! What the example binaries share: how they end on an error.

/// Exits with status 2 after printing the error of `result`, if it is one: its message alone,
/// as a backtrace (which Candle attaches with `RUST_BACKTRACE` set) says nothing to a user.
pub fn exit_on_error(result: candle_core::Result<()>) {
    if let Err(e) = result {
        let e = match e {
            candle_core::Error::WithBacktrace { inner, .. } => *inner,
            e => e,
        };
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}
