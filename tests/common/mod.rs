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
