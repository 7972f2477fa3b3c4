//! The `train` example as a user runs it: it fine-tunes each shipped model, lowers the loss,
//! and writes a checkpoint that the crate loads back with changed parameters.

mod common;
use candle_core::{DType, Device};
use candle_fused::Checkpoint;
use common::{example_binary, shipped, to_f64};
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

/// Bad arguments end the run before any step, with an error that names them: a step count that
/// is not a whole number, and an output directory that cannot be created (checked before the
/// steps, not when the result is saved).
#[test]
fn train_refuses_bad_arguments_before_training() {
    let binary = example_binary("train");
    let file = std::env::temp_dir().join(format!("candle-fused-train-file-{}", std::process::id()));
    std::fs::write(&file, b"not a directory").unwrap();
    let unwritable = file.join("out");
    let cases: [(Vec<&std::ffi::OsStr>, &str); 3] = [
        (vec!["--steps".as_ref(), "2.5".as_ref()], "--steps \"2.5\""),
        (vec!["--batch".as_ref(), "-3".as_ref()], "--batch \"-3\""),
        (
            vec!["--out".as_ref(), unwritable.as_os_str()],
            "cannot create",
        ),
    ];
    for (args, needle) in cases {
        let run = Command::new(&binary)
            .arg(shipped("sigmoid_residual"))
            .args(["--device", "cpu"])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: {stderr:?} lacks {needle:?}"
        );
        assert!(
            losses(&stderr).is_empty(),
            "{args:?}: steps ran: {stderr:?}"
        );
    }
    std::fs::remove_file(&file).unwrap();
}
