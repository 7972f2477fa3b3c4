//! Helpers shared by the integration tests (each test file uses some of them).
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor};
use candle_fused::Activation;
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

/// Asserts what PyTorch gives for an input whose first row holds a NaN, from the output `y`
/// of a linear layer with `activation` and the input's gradient `dx`: the first row of `y` is
/// all NaN and the others finite; the first row of `dx` is finite exactly for the identity and
/// relu (whose derivative PyTorch takes as 1 at a NaN: `threshold_backward` zeroes only
/// `z <= 0`), NaN for the others, and the other rows finite.
#[track_caller]
pub fn assert_nan_row_propagates(at: &str, activation: Activation, y: &Tensor, dx: &Tensor) {
    let rows = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .and_then(|t| t.to_vec2::<f64>())
            .unwrap()
    };
    let (y, dx) = (rows(y), rows(dx));
    assert!(
        y[0].iter().all(|v| v.is_nan()),
        "{at}: the NaN row's output {:?}",
        y[0]
    );
    assert!(
        y[1..].iter().flatten().all(|v| v.is_finite()),
        "{at}: other rows' output"
    );
    let passes = matches!(activation, Activation::Identity | Activation::Relu);
    assert!(
        dx[0].iter().all(|v| v.is_finite() == passes),
        "{at}: the NaN row's input gradient {:?}",
        dx[0]
    );
    assert!(
        dx[1..].iter().flatten().all(|v| v.is_finite()),
        "{at}: other rows' input gradient"
    );
}
