//! Runs a PyTorch checkpoint through the fused ops.
//!
//! ```text
//! cargo run --release --example run -- MODEL [--input FILE] [--output FILE] [--train]
//!     [--device cpu|cuda] [--dtype f32|f16|bf16] [--precision exact|tf32]
//! ```
//!
//! `MODEL` is a checkpoint directory (`config.json` + `model.safetensors`) or a Hugging Face
//! Hub repo id in the local cache. Without `--input`, the checkpoint's `golden.safetensors` (in
//! its directory, or in the repo's snapshot) is run and every output is compared with PyTorch's;
//! the exit status is non-zero when any is out of tolerance. With `--input FILE` (a safetensors
//! file with `x` and optionally `g`), the outputs are written to `--output` (floats as f32): `y`,
//! and given `g` the gradients `grad.x` and `grad.<parameter>`, and with `--train` on a BatchNorm
//! model the running statistics and the batch count (int64).

mod common;

use candle_core::{DType, Device, Result, Tensor};
use candle_fused::parity::{compare, forward_backward, tolerance, GradientPath};
use candle_fused::{Checkpoint, Model, Precision};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

const USAGE: &str = "usage: run MODEL [--input FILE] [--output FILE] [--train] [--device cpu|cuda] [--dtype f32|f16|bf16] [--precision exact|tf32]";

struct Args {
    model: String,
    input: Option<PathBuf>,
    output: Option<PathBuf>,
    train: bool,
    device: Option<String>,
    dtype: DType,
    precision: Precision,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        model: String::new(),
        input: None,
        output: None,
        train: false,
        device: None,
        dtype: DType::F32,
        precision: Precision::Exact,
    };
    let value = |flag: &str, args: &mut dyn Iterator<Item = String>| {
        args.next()
            .ok_or_else(|| candle_core::Error::Msg(format!("{flag} needs a value\n{USAGE}")))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--input" => parsed.input = Some(value("--input", &mut args)?.into()),
            "--output" => parsed.output = Some(value("--output", &mut args)?.into()),
            "--train" => parsed.train = true,
            "--device" => parsed.device = Some(value("--device", &mut args)?),
            "--dtype" => {
                parsed.dtype = match value("--dtype", &mut args)?.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    other => {
                        candle_core::bail!("unknown dtype {other:?}: expected f32, f16 or bf16")
                    }
                }
            }
            "--precision" => parsed.precision = value("--precision", &mut args)?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            flag if flag.starts_with("--") => candle_core::bail!("unknown option {flag}\n{USAGE}"),
            model if parsed.model.is_empty() => parsed.model = model.to_string(),
            extra => candle_core::bail!("unexpected argument {extra:?}\n{USAGE}"),
        }
    }
    if parsed.model.is_empty() {
        candle_core::bail!("missing MODEL\n{USAGE}");
    }
    if let Some(output) = &parsed.output {
        let Some(input) = &parsed.input else {
            candle_core::bail!("--output needs --input (without --input the golden is checked)");
        };
        check_output(output, input)?;
    }
    Ok(parsed)
}

/// Refuses, before any work, an `--output` that could not be written or that is the input.
fn check_output(output: &Path, input: &Path) -> Result<()> {
    let why = if output.is_dir() {
        Some("is a directory".to_string())
    } else if output
        .canonicalize()
        .ok()
        .is_some_and(|o| input.canonicalize().ok() == Some(o))
    {
        Some("is the --input file".to_string())
    } else {
        match output.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) if !parent.is_dir() => Some(format!(
                "is in {}, which is not a directory",
                parent.display()
            )),
            _ => None,
        }
    };
    match why {
        Some(why) => candle_core::bail!("cannot write --output {}: it {why}", output.display()),
        None => Ok(()),
    }
}

fn device(choice: Option<&str>) -> Result<Device> {
    match choice {
        None => Device::cuda_if_available(0),
        Some("cpu") => Ok(Device::Cpu),
        Some("cuda") if cfg!(feature = "cuda") => Device::new_cuda(0),
        Some("cuda") => candle_core::bail!("--device cuda needs a build with `--features cuda`"),
        Some(other) => candle_core::bail!("unknown device {other:?}: expected cpu or cuda"),
    }
}

fn device_name(device: &Device) -> &'static str {
    if device.is_cuda() {
        "cuda"
    } else {
        "cpu"
    }
}

fn read_safetensors(path: &PathBuf) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| candle_core::Error::Msg(format!("cannot read {}: {e}", path.display())))
}

fn main() {
    common::exit_on_error(run());
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let device = device(args.device.as_deref())?;
    let dir = Checkpoint::locate(&args.model)?;
    let checkpoint = Checkpoint::from_dir(&dir)?;
    let config = checkpoint.config.clone();
    // Variables, so that the gradients of the parameters can be read back.
    let varmap = checkpoint.var_map(args.dtype, &device)?;
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, args.dtype, &device);
    let model = Model::load(vb, &config)?.with_precision(args.precision);

    let golden_path = dir.join("golden.safetensors");
    let inputs = match &args.input {
        Some(path) => read_safetensors(path)?,
        None if golden_path.is_file() => read_safetensors(&golden_path)?,
        None => candle_core::bail!(
            "no --input given and {} has no golden.safetensors to check",
            dir.display()
        ),
    };
    let x = inputs
        .get("x")
        .ok_or_else(|| candle_core::Error::Msg("the input file has no tensor \"x\"".into()))?;
    // Any leading dimensions, as PyTorch's nn.Linear takes (the BatchNorm model's error names
    // its own need for a (batch, in) matrix).
    if !matches!(x.dims(), &[.., i] if i == config.in_features) || x.elem_count() == 0 {
        candle_core::bail!(
            "input x has shape {:?}, expected (..., {}) with at least one row",
            x.dims(),
            config.in_features
        );
    }
    let x = x.to_dtype(args.dtype)?.to_device(&device)?;
    let g = inputs
        .get("g")
        .map(|g| g.to_dtype(args.dtype)?.to_device(&device))
        .transpose()?;

    let start = Instant::now();
    let outputs = forward_backward(&model, &x, g.as_ref(), args.train, GradientPath::Trace)?;
    device.synchronize()?;
    let elapsed = start.elapsed();
    println!(
        "{} on {} {:?}{}: x {:?} -> y {:?}, {}, {} in {:.3} ms",
        config.kind.name(),
        device_name(&device),
        args.dtype,
        if args.dtype == DType::F32 && device.is_cuda() {
            format!(" ({:?})", args.precision)
        } else {
            String::new()
        },
        x.dims(),
        outputs[0].1.dims(),
        if args.train { "train" } else { "eval" },
        if g.is_some() {
            "forward+backward"
        } else {
            "forward"
        },
        elapsed.as_secs_f64() * 1e3,
    );

    match &args.output {
        Some(path) => {
            let mut written = HashMap::new();
            for (name, t) in &outputs {
                let t = t.to_device(&Device::Cpu)?;
                let t = if t.dtype().is_float() {
                    t.to_dtype(DType::F32)?
                } else {
                    t
                };
                written.insert(name.as_str(), t);
            }
            let cannot_write = |e: &dyn std::fmt::Display| {
                format!("cannot write --output {}: {e}", path.display())
            };
            let bytes = safetensors::serialize(&written, None)
                .map_err(|e| candle_core::Error::Msg(cannot_write(&e)))?;
            std::fs::write(path, bytes).map_err(|e| candle_core::Error::Msg(cannot_write(&e)))?;
            println!("wrote {} tensors to {}", written.len(), path.display());
        }
        None if args.input.is_none() => {
            let tf32 = args.precision == Precision::Tf32 && device.is_cuda();
            let tol = tolerance(args.dtype, tf32);
            let half = matches!(args.dtype, DType::F16 | DType::BF16);
            let comparisons = compare(&outputs, &inputs, args.train, tol, half)?;
            for c in &comparisons {
                println!(
                    "  {:<28} {} error {:.2e} {}",
                    c.name,
                    if c.relative { "rel" } else { "abs" },
                    c.error,
                    match (c.checked, c.ok) {
                        (false, _) =>
                            "not checked: BatchNorm cancels it below this dtype's resolution",
                        (true, true) => "ok",
                        (true, false) => "OUT OF TOLERANCE",
                    }
                );
            }
            let bad = comparisons.iter().filter(|c| !c.ok).count();
            if bad > 0 {
                candle_core::bail!(
                    "{bad} of {} tensors differ from PyTorch by more than {tol:.0e}",
                    comparisons.len()
                );
            }
            println!("all checked tensors match PyTorch within {tol:.0e}");
        }
        None => {}
    }
    Ok(())
}
