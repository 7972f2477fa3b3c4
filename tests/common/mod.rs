//! Helpers shared by the integration tests (each test file uses some of them).
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The directory of a shipped model, `models/NAME`.
pub fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name)
}

/// A shipped model's PyTorch goldens (`golden.safetensors`), on the CPU.
pub fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(shipped(name).join("golden.safetensors"), &Device::Cpu).unwrap()
}

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
