//! The `train` example as a user runs it: it fine-tunes each shipped model, lowers the loss,
//! and writes a checkpoint that the crate loads back with changed parameters.

mod common;
use candle_core::{DType, Device};
use candle_fused::Checkpoint;
use common::{example_binary, shipped, to_f64};
use std::path::PathBuf;
use std::process::Command;

/// Every `loss <value>` the progress display printed, in order.
fn losses(progress: &str) -> Vec<f64> {
    progress
        .split(['\r', '\n'])
        .filter_map(|line| line.split(" loss ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn train_lowers_the_loss_and_saves_a_loadable_checkpoint() {
    let binary = example_binary("train");
    assert!(binary.exists(), "{} is not built", binary.display());
    for model in ["swish_scale", "scale_batchnorm", "sigmoid_residual"] {
        let dir = shipped(model);
        let out =
            std::env::temp_dir().join(format!("candle-fused-train-{model}-{}", std::process::id()));
        let run = Command::new(&binary)
            .arg(&dir)
            .args(["--steps", "60", "--lr", "3e-3", "--device", "cpu", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{model}: train failed: {stderr}");
        let seen = losses(&stderr);
        assert!(seen.len() >= 2, "{model}: no progress in {stderr:?}");
        let (first, last) = (seen[0], seen[seen.len() - 1]);
        assert!(last < 0.9 * first, "{model}: loss {first} -> {last}");

        let before = Checkpoint::from_dir(&dir).unwrap();
        let after = Checkpoint::from_dir(&out).unwrap();
        assert_eq!(after.config, before.config, "{model}");
        let model_after = after.load_model(DType::F32, &Device::Cpu).unwrap();
        let model_before = before.load_model(DType::F32, &Device::Cpu).unwrap();
        for ((name, a), (_, b)) in model_after
            .parameters()
            .iter()
            .zip(model_before.parameters())
        {
            assert_ne!(to_f64(a), to_f64(&b), "{model}: {name} did not change");
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// A directory under the system temp dir for this test, emptied first.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("candle-fused-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// In f16 and bf16 the model computes in that dtype while AdamW steps f32 copies of its
/// parameters: in f16 alone, AdamW's first step divided by an underflowed second moment and
/// the loss was NaN from then on.
#[test]
fn train_in_half_precision_lowers_the_loss() {
    let binary = example_binary("train");
    let tmp = scratch("half");
    for dtype in ["f16", "bf16"] {
        for model in ["sigmoid_residual", "scale_batchnorm"] {
            let out = tmp.join(format!("{model}-{dtype}"));
            let run = Command::new(&binary)
                .arg(shipped(model))
                .args(["--steps", "60", "--lr", "3e-3", "--device", "cpu"])
                .args(["--dtype", dtype, "--out"])
                .arg(&out)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&run.stderr);
            assert!(run.status.success(), "{model} {dtype}: {stderr}");
            let seen = losses(&stderr);
            let (first, last) = (seen[0], seen[seen.len() - 1]);
            assert!(
                last < 0.9 * first,
                "{model} {dtype}: loss {first} -> {last}"
            );
            let after = Checkpoint::from_dir(&out).unwrap();
            for (name, t) in &after.tensors {
                assert!(
                    to_f64(t).iter().all(|v| v.is_finite()),
                    "{model} {dtype}: {name} is not finite"
                );
            }
        }
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Without `--out` the result goes to `NAME-finetuned` in the working directory.
#[test]
fn train_writes_next_to_the_caller_by_default() {
    let cwd = scratch("default-out");
    let run = Command::new(example_binary("train"))
        .arg(shipped("swish_scale"))
        .args(["--steps", "1", "--device", "cpu"])
        .current_dir(&cwd)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    Checkpoint::from_dir(cwd.join("swish_scale-finetuned")).unwrap();
    std::fs::remove_dir_all(&cwd).unwrap();
}

/// Bad arguments end the run before any step, with an error that names them and no backtrace
/// (even with `RUST_BACKTRACE` set): a step count that is not a whole number, a batch too
/// large to address, an output directory that cannot be created (checked before the steps, not
/// when the result is saved), and one that is the checkpoint itself or holds a golden, which
/// the result would overwrite or contradict.
#[test]
fn train_refuses_bad_arguments_before_training() {
    let binary = example_binary("train");
    let tmp = scratch("bad-args");
    let file = tmp.join("file");
    std::fs::write(&file, b"not a directory").unwrap();
    let unwritable = file.join("out");
    // A copy of a shipped checkpoint, with its golden.
    let source = tmp.join("source");
    std::fs::create_dir(&source).unwrap();
    for name in ["config.json", "model.safetensors", "golden.safetensors"] {
        std::fs::copy(shipped("sigmoid_residual").join(name), source.join(name)).unwrap();
    }
    let with_golden = tmp.join("with-golden");
    std::fs::create_dir(&with_golden).unwrap();
    std::fs::copy(
        source.join("golden.safetensors"),
        with_golden.join("golden.safetensors"),
    )
    .unwrap();
    let source_again = source.join(".");
    let huge = usize::MAX.to_string();
    let cases: [(Vec<&std::ffi::OsStr>, &str); 6] = [
        (vec!["--steps".as_ref(), "2.5".as_ref()], "--steps \"2.5\""),
        (vec!["--batch".as_ref(), "-3".as_ref()], "--batch \"-3\""),
        (
            vec!["--batch".as_ref(), huge.as_ref()],
            "is too large to address",
        ),
        (
            vec!["--out".as_ref(), unwritable.as_os_str()],
            "cannot create",
        ),
        (
            vec!["--out".as_ref(), source_again.as_os_str()],
            "is the checkpoint being fine-tuned",
        ),
        (
            vec!["--out".as_ref(), with_golden.as_os_str()],
            "holds a golden.safetensors",
        ),
    ];
    for (args, needle) in cases {
        let run = Command::new(&binary)
            .arg(&source)
            .args(["--device", "cpu"])
            .args(&args)
            .current_dir(&tmp)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: {stderr:?} lacks {needle:?}"
        );
        assert!(
            !stderr.contains("candle_core::error"),
            "{args:?}: a backtrace: {stderr}"
        );
        assert!(
            losses(&stderr).is_empty(),
            "{args:?}: steps ran: {stderr:?}"
        );
    }
    // Neither refused directory was touched, and no default output was left behind.
    assert!(!tmp.join("source-finetuned").exists());
    let source_after = Checkpoint::from_dir(&source).unwrap();
    let shipped_model = Checkpoint::from_dir(shipped("sigmoid_residual")).unwrap();
    for (name, t) in &shipped_model.tensors {
        assert_eq!(to_f64(&source_after.tensors[name]), to_f64(t), "{name}");
    }
    assert_eq!(std::fs::read_dir(&with_golden).unwrap().count(), 1);
    std::fs::remove_dir_all(&tmp).unwrap();
}
