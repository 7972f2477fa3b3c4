//! The `run` and `bench` examples as a user runs them: `run` on a checkpoint in a Hugging Face
//! Hub cache, both with output files they cannot or must not write, and bad arguments.

mod common;
use candle_fused::checkpoint::{CONFIG_FILE, WEIGHTS_FILE};
use common::{add_files_to_hub_cache, example_binary, shipped};
use std::path::PathBuf;
use std::process::{Command, Output};

/// A commit hash for the Hub cache layout.
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A directory under the system temp dir for this test, emptied first.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("candle-fused-run-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `run MODEL` on the CPU, with `HF_HOME` set to `hf_home`, from the directory `cwd`.
fn run(model: &str, hf_home: &PathBuf, cwd: &PathBuf) -> Output {
    let binary = example_binary("run");
    assert!(binary.exists(), "{} is not built", binary.display());
    Command::new(binary)
        .arg(model)
        .args(["--device", "cpu"])
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .current_dir(cwd)
        .output()
        .unwrap()
}

/// A repo id is looked up in the cache, and so is the golden that its snapshot holds: the run
/// checks it as it does a directory's.
#[test]
fn run_checks_the_golden_in_a_hub_snapshot() {
    let home = scratch("hub");
    let files = [CONFIG_FILE, WEIGHTS_FILE, "golden.safetensors"];
    let source = shipped("sigmoid_residual");
    add_files_to_hub_cache(
        &home.join("hub"),
        "org/name",
        COMMIT,
        &source,
        &files,
        Some("main"),
    );
    for model in ["org/name".to_string(), format!("org/name@{COMMIT}")] {
        let out = run(&model, &home, &home);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{model}: {stderr}");
        assert!(
            stdout.contains("grad.x"),
            "{model}: the golden was not checked: {stdout}"
        );
        assert!(!stdout.contains("FAIL"), "{model}: {stdout}");
    }
    // A mistyped relative directory is named as one, not only as a repo id.
    let out = run("no-such/dir", &home, &home);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no-such/dir is not a directory here"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&home).unwrap();
}

/// An unwritable `--json` path fails before anything is measured, and the error names it.
#[test]
fn bench_refuses_an_unwritable_json_path_before_measuring() {
    let dir = scratch("bench");
    let path = dir.join("absent").join("bench.json");
    let out = Command::new(example_binary("bench"))
        .args([
            "--device",
            "cpu",
            "--problems",
            "swish_scale",
            "--iters",
            "1",
            "--json",
        ])
        .arg(&path)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("cannot write --json {}", path.display())),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "measured before failing: {stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `run --output` refuses, before any work and naming the path, an output that is a directory,
/// that lies in no directory, or that is the `--input` file (which it would overwrite).
#[test]
fn run_refuses_an_output_it_cannot_or_must_not_write() {
    let dir = scratch("output");
    let input = dir.join("input.safetensors");
    std::fs::copy(
        shipped("sigmoid_residual").join("golden.safetensors"),
        &input,
    )
    .unwrap();
    let before = std::fs::read(&input).unwrap();
    for (output, why) in [
        (dir.clone(), "is a directory"),
        (
            dir.join("absent").join("out.safetensors"),
            "which is not a directory",
        ),
        (
            dir.join(".").join("input.safetensors"),
            "is the --input file",
        ),
    ] {
        let out = Command::new(example_binary("run"))
            .arg(shipped("sigmoid_residual"))
            .args(["--device", "cpu", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        let needle = format!("cannot write --output {}: it ", output.display());
        assert!(stderr.contains(&needle), "{stderr:?} lacks {needle:?}");
        assert!(stderr.contains(why), "{stderr:?} lacks {why:?}");
        assert!(
            !stderr.contains("candle_core::error"),
            "a backtrace: {stderr}"
        );
        assert!(stdout.is_empty(), "ran before failing: {stdout}");
    }
    assert_eq!(std::fs::read(&input).unwrap(), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Bad `bench` arguments fail before anything is measured or written: an unknown mode leaves an
/// existing `--json` file as it was, and `--iters 0` is refused rather than taken as 1.
#[test]
fn bench_refuses_bad_arguments_before_measuring() {
    let dir = scratch("bench-args");
    let json = dir.join("results.json");
    std::fs::write(&json, b"earlier results").unwrap();
    for (args, needle) in [
        (["--modes", "f64"], "unknown mode \"f64\""),
        (["--iters", "0"], "--iters must be at least 1"),
    ] {
        let out = Command::new(example_binary("bench"))
            .args(["--device", "cpu", "--problems", "swish_scale"])
            .args(args)
            .arg("--json")
            .arg(&json)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: {stderr:?} lacks {needle:?}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: measured before failing");
        assert_eq!(std::fs::read(&json).unwrap(), b"earlier results");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
