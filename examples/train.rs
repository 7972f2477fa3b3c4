//! Fine-tunes a PyTorch checkpoint on a synthetic regression task and saves the result as a
//! checkpoint with PyTorch's key names.
//!
//! ```text
//! cargo run --release --example train -- MODEL [--steps N] [--lr F] [--batch B]
//!     [--device cpu|cuda] [--dtype f32|f16|bf16] [--precision exact|tf32] [--out DIR]
//! ```
//!
//! The task: regress `tanh(x·Aᵀ)` for a fixed random `A`, from inputs of unit variance, with AdamW
//! on the model's parameters and the model in train mode (BatchNorm updates its running
//! statistics). In f16 and bf16 the model computes in that dtype while AdamW updates f32 copies
//! of its parameters, with its moments in f32 (mixed precision): in f16 alone, the second moment
//! of any gradient under about 1e-2 and AdamW's epsilon underflow to 0 and the first step divides
//! by zero. The result goes to `--out` (default `NAME-finetuned` in the working directory, NAME
//! the last part of MODEL), a directory that must not already hold a checkpoint's golden:
//! `config.json` and `model.safetensors` (the f32 parameters), which
//! `scripts/load_checkpoint.py` loads into the PyTorch module.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_fused::{Checkpoint, Model, Precision, TracedModuleT};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Batches in the synthetic dataset.
const DATASET_BATCHES: usize = 32;

const USAGE: &str = "usage: train MODEL [--steps N] [--lr F] [--batch B] [--device cpu|cuda] [--dtype f32|f16|bf16] [--precision exact|tf32] [--out DIR]";

struct Args {
    model: String,
    steps: usize,
    lr: f64,
    batch: usize,
    device: Device,
    dtype: DType,
    precision: Precision,
    out: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut model = None;
    let (mut steps, mut lr, mut batch) = (200usize, 1e-3f64, 64usize);
    let (mut device, mut dtype, mut precision, mut out) =
        (None, DType::F32, Precision::Exact, None);
    let mut args = std::env::args().skip(1);
    fn number<T: std::str::FromStr>(flag: &str, v: String) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        v.parse::<T>()
            .map_err(|e| candle_core::Error::Msg(format!("{flag} {v:?}: {e}")))
    }
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| candle_core::Error::Msg(format!("{arg} needs a value\n{USAGE}")))
        };
        match arg.as_str() {
            "--steps" => steps = number("--steps", value()?)?,
            "--lr" => lr = number("--lr", value()?)?,
            "--batch" => batch = number("--batch", value()?)?,
            "--device" => device = Some(value()?),
            "--dtype" => {
                dtype = match value()?.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    other => {
                        candle_core::bail!("unknown dtype {other:?}: expected f32, f16 or bf16")
                    }
                }
            }
            "--precision" => precision = value()?.parse()?,
            "--out" => out = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            flag if flag.starts_with("--") => candle_core::bail!("unknown option {flag}\n{USAGE}"),
            m if model.is_none() => model = Some(m.to_string()),
            extra => candle_core::bail!("unexpected argument {extra:?}\n{USAGE}"),
        }
    }
    let model = model.ok_or_else(|| candle_core::Error::Msg(format!("missing MODEL\n{USAGE}")))?;
    if steps == 0 || batch < 2 || lr.is_nan() || lr <= 0.0 {
        candle_core::bail!("--steps must be ≥ 1, --batch ≥ 2 and --lr > 0");
    }
    let device = match device.as_deref() {
        None => Device::cuda_if_available(0)?,
        Some("cpu") => Device::Cpu,
        Some("cuda") if cfg!(feature = "cuda") => Device::new_cuda(0)?,
        Some("cuda") => candle_core::bail!("--device cuda needs a build with `--features cuda`"),
        Some(other) => candle_core::bail!("unknown device {other:?}: expected cpu or cuda"),
    };
    // A Hub repo id's name without its revision, or a directory's last component.
    let name = model.trim_end_matches('/');
    let name = name.split('@').next().unwrap_or(name);
    let name = Path::new(name)
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy());
    let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}-finetuned")));
    Ok(Args {
        model,
        steps,
        lr,
        batch,
        device,
        dtype,
        precision,
        out,
    })
}

fn main() {
    common::exit_on_error(run());
}

/// Refuses an output directory that is the checkpoint being fine-tuned, or that holds a
/// checkpoint's PyTorch golden, which would then lie beside weights it does not describe.
fn check_out(out: &Path, source: &Path) -> Result<()> {
    let same = match (out.canonicalize(), source.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        candle_core::bail!(
            "--out {} is the checkpoint being fine-tuned: choose another directory",
            out.display()
        );
    }
    if out.join("golden.safetensors").exists() {
        candle_core::bail!(
            "--out {} holds a golden.safetensors, which would not describe the fine-tuned \
             weights: choose another directory",
            out.display()
        );
    }
    Ok(())
}

/// A (rows, cols) tensor of uniform values on [-bound, bound) on `device`; an error, not an
/// abort, where its values cannot be allocated.
fn uniform(
    rng: &mut StdRng,
    (rows, cols): (usize, usize),
    bound: f32,
    device: &Device,
) -> Result<Tensor> {
    let count = rows.checked_mul(cols).ok_or_else(|| {
        candle_core::Error::Msg(format!("a {rows}x{cols} tensor is too large to address"))
    })?;
    let mut values = Vec::new();
    values.try_reserve_exact(count).map_err(|e| {
        candle_core::Error::Msg(format!("cannot allocate a {rows}x{cols} tensor: {e}"))
    })?;
    values.extend((0..count).map(|_| rng.random_range(-bound..bound)));
    Tensor::from_vec(values, (rows, cols), device)
}

/// The model's parameters as the optimizer steps them: the model's own variables in f32; in
/// a 16-bit dtype f32 copies ("master weights"), which [`Masters::step`] rounds back into the
/// model after each step.
struct Masters {
    model: Vec<Var>,
    master: Vec<Var>,
}

impl Masters {
    fn new(model: Vec<Var>) -> Result<Self> {
        let master = model
            .iter()
            .map(|v| match v.dtype() {
                DType::F32 => Ok(v.clone()),
                _ => Var::from_tensor(&v.to_dtype(DType::F32)?),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { model, master })
    }

    /// One optimizer step from the model's gradients `grads`.
    fn step(&self, optimizer: &mut AdamW, grads: &GradStore) -> Result<()> {
        let mut master_grads = GradStore::default();
        for (model, master) in self.model.iter().zip(&self.master) {
            if let Some(g) = grads.get(model.as_tensor()) {
                master_grads.insert(master.as_tensor(), g.to_dtype(DType::F32)?);
            }
        }
        optimizer.step(&master_grads)?;
        for (model, master) in self.model.iter().zip(&self.master) {
            if model.dtype() != DType::F32 {
                model.set(&master.as_tensor().to_dtype(model.dtype())?)?;
            }
        }
        Ok(())
    }
}

/// A one-line progress bar on stderr.
fn progress(step: usize, steps: usize, loss: f32, start: Instant) {
    let width = 30;
    let done = width * step / steps;
    eprint!(
        "\r[{}{}] {step}/{steps} loss {loss:.5} {:.1}s",
        "#".repeat(done),
        "-".repeat(width - done),
        start.elapsed().as_secs_f64()
    );
    let _ = std::io::stderr().flush();
}

fn run() -> Result<()> {
    let args = parse_args()?;
    candle_fused::keep_freed_device_memory(&args.device)?;
    let source = Checkpoint::locate(&args.model)?;
    let checkpoint = Checkpoint::from_dir(&source)?;
    check_out(&args.out, &source)?;
    // The output directory before the steps, so that an unwritable one fails at once; a run
    // that fails removes it again if it made it and left it empty.
    let made_out = !args.out.exists();
    std::fs::create_dir_all(&args.out).map_err(|e| {
        candle_core::Error::Msg(format!("cannot create {}: {e}", args.out.display()))
    })?;
    let result = fine_tune(&args, &checkpoint);
    if result.is_err() && made_out {
        let _ = std::fs::remove_dir(&args.out);
    }
    result
}

fn fine_tune(args: &Args, checkpoint: &Checkpoint) -> Result<()> {
    let config = checkpoint.config.clone();
    let varmap = checkpoint.var_map(args.dtype, &args.device)?;
    let vb = VarBuilder::from_varmap(&varmap, args.dtype, &args.device);
    let model = Model::load(vb, &config)?.with_precision(args.precision);
    println!(
        "fine-tuning {} ({} -> {}) on {:?} {:?}: {} steps of batch {}, AdamW lr {}",
        config.kind.name(),
        config.in_features,
        config.out_features,
        args.device.location(),
        args.dtype,
        args.steps,
        args.batch,
        args.lr
    );

    // The synthetic task, fixed by a seed: a dataset of batches, made once and cycled.
    let mut rng = StdRng::seed_from_u64(0);
    // Uniform on [-√3, √3]: zero mean, unit variance.
    let mut unit = |shape: (usize, usize)| uniform(&mut rng, shape, 3f32.sqrt(), &args.device);
    let teacher =
        (unit((config.out_features, config.in_features))? / (config.in_features as f64).sqrt())?;
    let dataset = (0..DATASET_BATCHES)
        .map(|_| {
            let x = unit((args.batch, config.in_features))?;
            let target = x.matmul(&teacher.t()?)?.tanh()?;
            Ok((x.to_dtype(args.dtype)?, target))
        })
        .collect::<Result<Vec<_>>>()?;

    let params = ParamsAdamW {
        lr: args.lr,
        weight_decay: 0.0,
        ..Default::default()
    };
    let masters = Masters::new(model.trainable_vars()?)?;
    let mut optimizer = AdamW::new(masters.master.clone(), params)?;
    let start = Instant::now();
    let mut last = f32::NAN;
    for step in 1..=args.steps {
        let (x, target) = &dataset[step % DATASET_BATCHES];
        // The forward through a Trace; the loss's gradient at y from Candle's autograd on a
        // leaf copy of y; the model's gradients from the trace, straight into the optimizer.
        let (y, trace) = model.forward_traced(x, true)?;
        let y_leaf = Var::from_tensor(&y.to_dtype(DType::F32)?)?;
        let loss = candle_nn::loss::mse(y_leaf.as_tensor(), target)?;
        let dy = match loss.backward()?.get(y_leaf.as_tensor()) {
            Some(dy) => dy.to_dtype(args.dtype)?,
            None => candle_core::bail!("the loss does not depend on the model's output"),
        };
        masters.step(&mut optimizer, &trace.backward(&dy)?)?;
        // The loss is read (a device synchronisation) only every ten steps.
        if step == 1 || step % 10 == 0 || step == args.steps {
            last = loss.to_scalar::<f32>()?;
            progress(step, args.steps, last, start);
            if !last.is_finite() {
                eprintln!();
                candle_core::bail!("the loss diverged ({last}) at step {step}; try a smaller --lr");
            }
        }
    }
    eprintln!();

    // The f32 parameters, under the model's names, and the model's buffers.
    let mut tensors: Vec<(String, Tensor)> = model
        .parameters()
        .into_iter()
        .zip(&masters.master)
        .map(|((name, _), master)| (name, master.as_tensor().clone()))
        .collect();
    tensors.extend(model.buffers());
    Checkpoint::save(&args.out, &config, &tensors)?;
    println!(
        "final loss {last:.5}; saved {} tensors to {}",
        tensors.len(),
        args.out.display()
    );
    Ok(())
}
