//! Helpers shared by the integration tests (each test file uses some of them).
#![allow(dead_code)]

use candle_core::{DType, Result, Tensor};

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

/// A tensor's elements as f64, on the host.
pub fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}
