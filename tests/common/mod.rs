//! Helpers shared by the integration tests (each test file uses some of them).
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor};
use candle_fused::Activation;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The binary of example `name`, which `cargo test` builds next to the test binaries.
pub fn example_binary(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let profile_dir = deps.parent().and_then(|d| d.parent()).unwrap();
    profile_dir.join("examples").join(name)
}

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

/// Lays out Hub cache entries under `cache`: repo `repo_id` with a snapshot `commit` holding
/// copies of `files` from `source`, and `refs/<reference>` naming the commit (if given). The
/// files are symlinks into `blobs/` as in the Hub's own cache, where the platform has
/// symlinks.
pub fn add_files_to_hub_cache(
    cache: &Path,
    repo_id: &str,
    commit: &str,
    source: &Path,
    files: &[&str],
    reference: Option<&str>,
) {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    for file in files {
        let blob = format!("{commit}-{file}");
        std::fs::copy(source.join(file), repo.join("blobs").join(&blob)).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&blob), snapshot.join(file))
            .unwrap();
        #[cfg(not(unix))]
        std::fs::copy(repo.join("blobs").join(&blob), snapshot.join(file)).unwrap();
    }
    if let Some(reference) = reference {
        let path = repo.join("refs").join(reference);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, commit).unwrap();
    }
}

/// Asserts that a train-mode BatchNorm's backward sees the `x̂` its forward normalised, on
/// `device` in `dtype`, on an (m, k, n) problem. A shift of `u` does not change the output of
/// the normalisation, so under a linear epilogue (`u = z·s`) the bias gradient cancels:
/// Σᵢ duᵢ = 0 wherever Σᵢ x̂ᵢ = 0. That holds only if the backward's `x̂` are the forward's: one
/// that rebuilds `u` unrounded, or from another `z`, moves each `x̂` by up to ulp(u)/σ, which
/// leaves a good part of the terms where the columns' means lie far from their spread, as here
/// (offsets up to 24, spread near 1). The bound is relative to the size of the sum's terms.
pub fn assert_batch_norm_cancels_a_shift(
    device: &Device,
    dtype: DType,
    (m, k, n): (usize, usize, usize),
) {
    use candle_fused::{fused_linear_batch_norm_traced, BatchNormParams, Epilogue, Precision};
    let values = |shape: &[usize], seed: u64, lo: f64, hi: f64| {
        let count: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f64> = (0..count)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                lo + (hi - lo) * ((state >> 11) as f64 / (1u64 << 53) as f64)
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.to_device(device))
            .unwrap()
    };
    let x = values(&[m, k], 1, -1.0, 1.0);
    let w = values(&[n, k], 2, -1.0, 1.0)
        .affine(1.0 / (k as f64).sqrt(), 0.0)
        .unwrap();
    let bias = values(&[n], 3, -24.0, 24.0);
    let scale = values(&[n], 4, 0.5, 2.0);
    let gamma = values(&[n], 5, 0.5, 2.0);
    let beta = values(&[n], 6, -1.0, 1.0);
    let g = values(&[m, n], 7, -1.0, 1.0);
    let eps = 1e-5;
    let bn = BatchNormParams {
        weight: &gamma,
        bias: &beta,
        running_mean: &beta,
        running_var: &gamma,
        eps,
        update: None,
    };
    let (gamma_h, g_h) = (to_f64(&gamma), to_f64(&g));
    for (epilogue, scale) in [
        (Epilogue::IDENTITY, None),
        (Epilogue::per_feature_scale(), Some(&scale)),
    ] {
        let (_, stats, trace) = fused_linear_batch_norm_traced(
            &x,
            &w,
            Some(&bias),
            scale,
            epilogue,
            &bn,
            true,
            Precision::Exact,
        )
        .unwrap();
        let d_bias = to_f64(trace.backward(&g).unwrap().get(&bias).unwrap());
        let var = to_f64(&stats.unwrap().var);
        for j in 0..n {
            // Σᵢ |duᵢ| is about γ·Σᵢ |gᵢ| / σ.
            let terms = (0..m).map(|i| g_h[i * n + j].abs()).sum::<f64>() * gamma_h[j].abs()
                / (var[j] + eps).sqrt();
            assert!(
                d_bias[j].abs() <= 1e-6 * terms,
                "{dtype:?} {m}x{k}->{n} {epilogue:?}: column {j}: the bias gradient {:.3e} \
                 does not cancel (terms {terms:.3e})",
                d_bias[j]
            );
        }
    }
}
