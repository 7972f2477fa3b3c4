//! Times the fused models against the same models written with plain Candle ops.
//!
//! ```text
//! cargo run --release --example bench -- [--device cpu|cuda] [--modes f32,tf32,bf16,f16]
//!     [--problems swish_scale,scale_batchnorm,sigmoid_residual] [--size reference|mid]
//!     [--train] [--iters N] [--json FILE]
//! ```
//!
//! Each cell is the median of `--iters` timed runs after warm-up runs, synchronised with the
//! device after every run, cycling through three different inputs. On CUDA a run is timed as
//! PyTorch's peers time theirs, by events recorded on the stream before and after it; the
//! `submit ms` column is the host time until the run returns with its work still queued (the
//! launch overhead, which the GPU waits out before a forward's first kernel), and the JSON
//! output also has each run's wall time including the synchronisation (`host_ms`). On the GPU
//! the default sizes are the reference sizes the models were written for; on the CPU, `mid`
//! sizes. With `--train` it also times a train step: forward, and backward to the input and
//! every parameter given the output's gradient (candle-fused through its `Trace`, and as
//! `autograd` through Candle's `Tensor::backward`; plain Candle through `Tensor::backward`).
//! The floor of a cell is the larger of the time to read the operands and write the output at
//! the measured copy bandwidth, and the time of its FLOPs at the measured rate of a large
//! plain matmul in the same precision.

mod common;

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, Var};
use candle_fused::{Checkpoint, Model, ModelConfig, ModelKind, Precision, TracedModuleT};
use std::time::Instant;

const USAGE: &str = "usage: bench [--device cpu|cuda] [--modes f32,tf32,bf16,f16] [--problems a,b] [--size reference|mid] [--train] [--iters N] [--json FILE]";

struct Args {
    device: Device,
    modes: Vec<String>,
    problems: Vec<ModelKind>,
    reference_size: bool,
    train: bool,
    iters: usize,
    json: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut device = Device::cuda_if_available(0)?;
    let (mut modes, mut problems, mut size) = (None, None, None);
    let (mut train, mut iters, mut json) = (false, 30, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| candle_core::Error::Msg(format!("{arg} needs a value\n{USAGE}")))
        };
        match arg.as_str() {
            "--device" => {
                device = match value()?.as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" if cfg!(feature = "cuda") => Device::new_cuda(0)?,
                    "cuda" => {
                        candle_core::bail!("--device cuda needs a build with `--features cuda`")
                    }
                    other => candle_core::bail!("unknown device {other:?}: expected cpu or cuda"),
                }
            }
            "--modes" => modes = Some(value()?),
            "--problems" => problems = Some(value()?),
            "--size" => size = Some(value()?),
            "--train" => train = true,
            "--iters" => {
                iters = value()?
                    .parse()
                    .map_err(|e| candle_core::Error::Msg(format!("--iters: {e}")))?
            }
            "--json" => json = Some(value()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => candle_core::bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let gpu = device.is_cuda();
    let modes = modes.unwrap_or_else(|| {
        if gpu {
            "f32,tf32,bf16".into()
        } else {
            "f32".into()
        }
    });
    let problems = problems
        .unwrap_or_else(|| "swish_scale,scale_batchnorm,sigmoid_residual".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<ModelKind>>>()?;
    let modes: Vec<String> = modes.split(',').map(str::to_string).collect();
    for mode in &modes {
        mode_kind(mode)?;
    }
    if iters == 0 {
        candle_core::bail!("--iters must be at least 1");
    }
    let reference_size = match size.as_deref() {
        None => gpu,
        Some("reference") => true,
        Some("mid") => false,
        Some(other) => candle_core::bail!("unknown size {other:?}: expected reference or mid"),
    };
    Ok(Args {
        device,
        modes,
        problems,
        reference_size,
        train,
        iters,
        json,
    })
}

/// `(batch, in, out)` of a problem.
fn problem_size(kind: ModelKind, reference: bool) -> (usize, usize, usize) {
    match (kind, reference) {
        (ModelKind::SwishScale, true) => (128, 32768, 32768),
        (_, true) => (1024, 8192, 8192),
        (ModelKind::SwishScale, false) => (64, 2048, 2048),
        (_, false) => (256, 1024, 1024),
    }
}

/// The same model in plain Candle ops: `candle_nn::Linear`, pointwise ops, `candle_nn::BatchNorm`.
struct PlainModel {
    kind: ModelKind,
    linear: candle_nn::Linear,
    scale: Option<Tensor>,
    bn: Option<candle_nn::BatchNorm>,
    factor: f64,
}

impl PlainModel {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let z = self.linear.forward(x)?;
        match self.kind {
            ModelKind::SwishScale => (&z * candle_nn::ops::sigmoid(&z)?)? * self.factor,
            ModelKind::SigmoidResidual => (candle_nn::ops::sigmoid(&z)? * self.factor)? + z,
            ModelKind::ScaleBatchNorm => {
                let u = z.broadcast_mul(self.scale.as_ref().expect("scale"))?;
                self.bn.as_ref().expect("bn").forward_t(&u, train)
            }
        }
    }
}

/// Random parameters with PyTorch's names for both versions of a model: variables when
/// `trainable` (so that a train step reaches them), else plain tensors as in inference.
fn build(
    kind: ModelKind,
    (_, i, o): (usize, usize, usize),
    dtype: DType,
    device: &Device,
    trainable: bool,
) -> Result<(Model, PlainModel)> {
    let config = ModelConfig {
        kind,
        in_features: i,
        out_features: o,
        scaling_factor: (kind != ModelKind::ScaleBatchNorm).then_some(2.0),
        eps: 1e-5,
        momentum: Some(0.1),
    };
    let bound = 1.0 / (i as f64).sqrt();
    let var = |shape: &[usize], lo: f64, hi: f64| -> Result<Tensor> {
        let t = Tensor::rand(lo as f32, hi as f32, shape, device)?.to_dtype(dtype)?;
        match trainable {
            true => Ok(Var::from_tensor(&t)?.as_tensor().clone()),
            false => Ok(t),
        }
    };
    let prefix = kind.linear_prefix();
    let mut named = vec![
        (format!("{prefix}.weight"), var(&[o, i], -bound, bound)?),
        (format!("{prefix}.bias"), var(&[o], -bound, bound)?),
    ];
    if kind == ModelKind::ScaleBatchNorm {
        for (name, lo, hi) in [
            ("scale", 0.5, 1.5),
            ("bn.weight", 0.5, 1.5),
            ("bn.bias", -0.5, 0.5),
            ("bn.running_mean", -0.1, 0.1),
            ("bn.running_var", 0.5, 1.5),
        ] {
            named.push((name.to_string(), var(&[o], lo, hi)?));
        }
        named.push((
            "bn.num_batches_tracked".to_string(),
            Tensor::new(0i64, device)?,
        ));
    }
    let tensors = named.iter().cloned().collect();
    let checkpoint = Checkpoint {
        config: config.clone(),
        tensors,
    };
    let fused = Model::load(checkpoint.var_builder(dtype, device), &config)?;
    let get = |name: &str| {
        named
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .expect("named tensor")
    };
    let linear = candle_nn::Linear::new(
        get(&format!("{prefix}.weight")),
        Some(get(&format!("{prefix}.bias"))),
    );
    let (scale, bn) = if kind == ModelKind::ScaleBatchNorm {
        // candle-nn's train-mode BatchNorm computes the batch statistics of f16/bf16 inputs in
        // f32 and blends them into the running statistics, which must then be f32 too.
        let bn = candle_nn::BatchNorm::new(
            o,
            get("bn.running_mean").to_dtype(DType::F32)?,
            get("bn.running_var").to_dtype(DType::F32)?,
            get("bn.weight"),
            get("bn.bias"),
            1e-5,
        )?;
        (Some(get("scale")), Some(bn))
    } else {
        (None, None)
    };
    let plain = PlainModel {
        kind,
        linear,
        scale,
        bn,
        factor: 2.0,
    };
    Ok((fused, plain))
}

/// Medians of `iters` timed runs of `run(i)` after warm-up runs, in milliseconds.
struct Timing {
    /// On CUDA, the time between events recorded on the device's stream before and after the
    /// run, as PyTorch's peers time theirs; on the CPU, the wall time.
    median_ms: f64,
    /// The wall time of the run and of the synchronisation that ends it.
    host_ms: f64,
    /// The host time until the run returns, its device work still queued: the launch overhead
    /// on CUDA, everything on the CPU.
    submit_ms: f64,
}

/// Times `run(i)` over `iters` runs after 3 warm-up runs, synchronising the device after each.
fn time(device: &Device, iters: usize, mut run: impl FnMut(usize) -> Result<()>) -> Result<Timing> {
    for i in 0..3 {
        run(i)?;
    }
    device.synchronize()?;
    let mut device_times = Vec::with_capacity(iters);
    let mut host_times = Vec::with_capacity(iters);
    let mut submit_times = Vec::with_capacity(iters);
    for i in 0..iters {
        let start = Instant::now();
        let device_ms = on_device_clock(device, || {
            run(i)?;
            submit_times.push(start.elapsed().as_secs_f64() * 1e3);
            Ok(())
        })?;
        device.synchronize()?;
        host_times.push(start.elapsed().as_secs_f64() * 1e3);
        device_times.extend(device_ms);
    }
    let median = |mut times: Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times.get(times.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let host_ms = median(host_times);
    Ok(Timing {
        median_ms: if device_times.is_empty() {
            host_ms
        } else {
            median(device_times)
        },
        host_ms,
        submit_ms: median(submit_times),
    })
}

/// Runs `run` between two timing events on a CUDA device's stream and returns the milliseconds
/// between them; `None` on other devices.
#[cfg(feature = "cuda")]
fn on_device_clock(device: &Device, run: impl FnOnce() -> Result<()>) -> Result<Option<f64>> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    let Device::Cuda(cuda) = device else {
        run()?;
        return Ok(None);
    };
    let stream = cuda.cuda_stream();
    let record = || {
        stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(candle_core::Error::wrap)
    };
    let start = record()?;
    run()?;
    let end = record()?;
    let ms = start.elapsed_ms(&end).map_err(candle_core::Error::wrap)?;
    Ok(Some(f64::from(ms)))
}

#[cfg(not(feature = "cuda"))]
fn on_device_clock(_device: &Device, run: impl FnOnce() -> Result<()>) -> Result<Option<f64>> {
    run()?;
    Ok(None)
}

/// Device ceilings measured now: copy bandwidth (bytes read + written per second) and the
/// rate of an n³ plain matmul per mode.
fn ceilings(device: &Device, modes: &[String]) -> Result<(f64, Vec<(String, f64)>)> {
    let (n, elems) = if device.is_cuda() {
        (8192, 1 << 28)
    } else {
        (1024, 1 << 24)
    };
    let bandwidth = 2.0 * 4.0 * elems as f64 / (copy_ms(device, elems)? * 1e-3);
    let mut rates = Vec::new();
    for mode in modes {
        let (dtype, _) = mode_settings(mode)?;
        let x = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
        let ms = time(device, 5, |_| x.matmul(&x).map(drop))?.median_ms;
        rates.push((mode.clone(), 2.0 * (n as f64).powi(3) / (ms * 1e-3)));
    }
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    Ok((bandwidth, rates))
}

/// Median milliseconds to copy `elems` f32 values from one buffer to another. On CUDA this is
/// the driver's device-to-device copy, which PyTorch's `copy_` also runs for a contiguous tensor
/// (Candle's `slice_set` runs an element-wise kernel, which reached 1.84 TB/s on an H100 where
/// PyTorch's copy reached 2.94).
#[cfg(feature = "cuda")]
fn copy_ms(device: &Device, elems: usize) -> Result<f64> {
    let Device::Cuda(cuda) = device else {
        return tensor_copy_ms(device, elems);
    };
    let stream = cuda.cuda_stream();
    let src = stream
        .alloc_zeros::<f32>(elems)
        .map_err(candle_core::Error::wrap)?;
    let mut dst = stream
        .alloc_zeros::<f32>(elems)
        .map_err(candle_core::Error::wrap)?;
    let timing = time(device, 10, |_| {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(candle_core::Error::wrap)
    })?;
    Ok(timing.median_ms)
}

#[cfg(not(feature = "cuda"))]
fn copy_ms(device: &Device, elems: usize) -> Result<f64> {
    tensor_copy_ms(device, elems)
}

/// Median milliseconds of Candle copying `elems` f32 values into another tensor.
fn tensor_copy_ms(device: &Device, elems: usize) -> Result<f64> {
    let src = Tensor::rand(0f32, 1.0, elems, device)?;
    let dst = Tensor::zeros(elems, DType::F32, device)?;
    Ok(time(device, 10, |_| dst.slice_set(&src, 0, 0))?.median_ms)
}

/// The dtype and precision of a mode; sets Candle's own TF32 switch for the plain models.
fn mode_settings(mode: &str) -> Result<(DType, Precision)> {
    candle_core::cuda::set_gemm_reduced_precision_f32(mode == "tf32");
    mode_kind(mode)
}

/// The dtype and precision of a mode.
fn mode_kind(mode: &str) -> Result<(DType, Precision)> {
    Ok(match mode {
        "f32" => (DType::F32, Precision::Exact),
        "tf32" => (DType::F32, Precision::Tf32),
        "bf16" => (DType::BF16, Precision::Exact),
        "f16" => (DType::F16, Precision::Exact),
        other => candle_core::bail!("unknown mode {other:?}: expected f32, tf32, bf16 or f16"),
    })
}

fn main() {
    common::exit_on_error(run());
}

fn run() -> Result<()> {
    let args = parse_args()?;
    // Opened before the minutes of measuring, so that an unwritable path fails at once, but
    // emptied only when the results are written: a failed run leaves an older file as it was.
    let json_file = match &args.json {
        Some(path) => Some((
            path,
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| cannot_write(path, e))?,
        )),
        None => None,
    };
    let device = &args.device;
    // Both implementations reuse freed device memory, as PyTorch does.
    candle_fused::keep_freed_device_memory(device)?;
    let (bandwidth, rates) = ceilings(device, &args.modes)?;
    println!(
        "device {}, copy {:.0} GB/s, matmul {}",
        if device.is_cuda() { "cuda:0" } else { "cpu" },
        bandwidth / 1e9,
        rates
            .iter()
            .map(|(m, r)| format!("{m} {:.1} TFLOP/s", r / 1e12))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "{:<17} {:<5} {:<6} {:<8} {:>10} {:>9} {:>8} {:>9}",
        "problem", "mode", "step", "impl", "median ms", "TFLOP/s", "floor %", "submit ms"
    );
    let mut rows = Vec::new();
    for &kind in &args.problems {
        let size @ (b, i, o) = problem_size(kind, args.reference_size);
        for (mode, rate) in &rates {
            let (dtype, precision) = mode_settings(mode)?;
            let xs = (0..3)
                .map(|_| Tensor::rand(-1f32, 1.0, (b, i), device)?.to_dtype(dtype))
                .collect::<Result<Vec<_>>>()?;
            let g = Tensor::randn(0f32, 1.0, (b, o), device)?.to_dtype(dtype)?;
            let flops = 2.0 * (b * i * o) as f64;
            let bytes = dtype.size_in_bytes() as f64 * (b * i + i * o + 2 * b * o) as f64;
            let floor_ms = (bytes / bandwidth).max(flops / rate) * 1e3;
            let train_mode = kind == ModelKind::ScaleBatchNorm;
            let mut steps = vec![("fwd", 1.0)];
            if args.train {
                steps.push(("train", 3.0));
            }
            for (step, flop_factor) in steps {
                // Inference on plain tensors (nothing kept for a backward); training on variables.
                let (fused, plain) = build(kind, size, dtype, device, step == "train")?;
                let fused = fused.with_precision(precision);
                // The train step of candle-fused runs through its Trace; "autograd" is the same
                // op through Candle's `Tensor::backward`, which adds every gradient into a
                // zero-initialised store.
                let variants: &[&str] = match step {
                    "fwd" => &["fused", "plain"],
                    _ => &["fused", "autograd", "plain"],
                };
                for &variant in variants {
                    let timing = time(device, args.iters, |it| {
                        let x = &xs[it % xs.len()];
                        match (step, variant) {
                            ("fwd", "fused") => fused.forward_t(x, train_mode).map(drop),
                            ("fwd", _) => plain.forward(x, train_mode).map(drop),
                            (_, "fused") => {
                                let (_, trace) = fused.forward_traced(x, train_mode)?;
                                trace.backward(&g).map(drop)
                            }
                            (_, variant) => {
                                let x = Var::from_tensor(x)?;
                                let y = match variant {
                                    "autograd" => fused.forward_t(x.as_tensor(), train_mode)?,
                                    _ => plain.forward(x.as_tensor(), train_mode)?,
                                };
                                (y * &g)?.sum_all()?.backward().map(drop)
                            }
                        }
                    })?;
                    let ms = timing.median_ms;
                    let tflops = flop_factor * flops / (ms * 1e-3) / 1e12;
                    let floor_pct = 100.0 * flop_factor * floor_ms / ms;
                    println!(
                        "{:<17} {:<5} {:<6} {:<8} {:>10.3} {:>9.1} {:>8.1} {:>9.3}",
                        kind.name(),
                        mode,
                        step,
                        variant,
                        ms,
                        tflops,
                        floor_pct,
                        timing.submit_ms
                    );
                    rows.push(serde_json::json!({
                        "problem": kind.name(), "mode": mode, "step": step, "impl": variant,
                        "batch": b, "in": i, "out": o, "median_ms": ms, "host_ms": timing.host_ms, "submit_ms": timing.submit_ms, "tflops": tflops, "floor_pct": floor_pct,
                    }));
                }
            }
        }
    }
    if let Some((path, file)) = json_file {
        let doc = serde_json::json!({
            "device": if device.is_cuda() { "cuda:0" } else { "cpu" },
            "copy_gbps": bandwidth / 1e9,
            "matmul_tflops": rates.iter().map(|(m, r)| (m.clone(), serde_json::json!(r / 1e12))).collect::<serde_json::Map<_, _>>(),
            "iters": args.iters,
            "rows": rows,
        });
        file.set_len(0).map_err(|e| cannot_write(path, e))?;
        serde_json::to_writer_pretty(file, &doc).map_err(|e| cannot_write(path, e))?;
    }
    Ok(())
}

fn cannot_write(path: &str, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("cannot write --json {path}: {e}"))
}
