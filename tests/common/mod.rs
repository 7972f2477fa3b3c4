//! Helpers shared by the integration tests.

use candle_core::Result;

/// Asserts that `result` is an error whose message contains every one of `needles`.
#[track_caller]
pub fn assert_err<T>(result: Result<T>, needles: &[&str]) -> String {
    match result {
        Ok(_) => panic!("expected an error mentioning {needles:?}, got Ok"),
        Err(e) => {
            let msg = e.to_string();
            for needle in needles {
                assert!(
                    msg.contains(needle),
                    "the error {msg:?} does not mention {needle:?}"
                );
            }
            msg
        }
    }
}
