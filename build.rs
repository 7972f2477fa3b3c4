//! Builds the CUDA kernels of `cuda-kernels/` into a static library when the `cuda` feature is
//! on; does nothing otherwise.
//!
//! Environment:
//! - `NVCC`: the compiler; else `$CUDA_ROOT`/`$CUDA_PATH`/`$CUDA_HOME`/bin/nvcc; else `nvcc` on
//!   `PATH`.
//! - `CUDA_COMPUTE_CAP`: target architectures, a comma-separated list such as `90` or `80,90`
//!   (default 90). 90 builds `sm_90a`; others build `sm_XX`.
//! - `CUTLASS_DIR`: the CUTLASS 4.2 headers (the directory holding `include/cutlass`) for the
//!   Hopper path when 90 is a target; else the `nvidia-cutlass` wheel of `python3` on `PATH`.
//! - `CANDLE_FUSED_NO_SM90=1`: build without the Hopper path (no CUTLASS needed).
//! - `CANDLE_FUSED_PTXAS_VERBOSE=1`: print ptxas's register and spill report as build warnings.
//!
//! Any spill or warning C7510 reported by ptxas is forwarded as a cargo warning, but for the
//! spills listed in `MEASURED_SPILLS`.

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNEL_DIR: &str = "cuda-kernels";

fn main() {
    for var in [
        "CARGO_FEATURE_CUDA",
        "NVCC",
        "CUDA_ROOT",
        "CUDA_PATH",
        "CUDA_HOME",
        "CUDA_COMPUTE_CAP",
        "CANDLE_FUSED_PTXAS_VERBOSE",
        "CANDLE_FUSED_NO_SM90",
        "CUTLASS_DIR",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(message) = build_kernels() {
        panic!("candle-fused: cannot build the CUDA kernels: {message}");
    }
}

fn build_kernels() -> Result<(), String> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let nvcc = find_nvcc()?;
    let arch_flags = arch_flags()?;
    let verbose = std::env::var("CANDLE_FUSED_PTXAS_VERBOSE").is_ok_and(|v| v == "1");

    let mut sources = Vec::new();
    let entries =
        std::fs::read_dir(KERNEL_DIR).map_err(|e| format!("reading {KERNEL_DIR}/: {e}"))?;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("reading {KERNEL_DIR}/: {e}"))?
            .path();
        println!("cargo:rerun-if-changed={}", path.display());
        if path.extension().is_some_and(|e| e == "cu") {
            sources.push(path);
        }
    }
    sources.sort();
    if sources.is_empty() {
        return Err(format!("no .cu files in {KERNEL_DIR}/"));
    }

    let cutlass = sm90_flags(&arch_flags)?;
    let mut objects = Vec::new();
    for src in &sources {
        let stem = src.file_stem().unwrap_or_default().to_string_lossy();
        let obj = out_dir.join(format!("{stem}.o"));
        let mut cmd = Command::new(&nvcc);
        cmd.args([
            "-O3",
            "-std=c++17",
            "-Xcompiler",
            "-fPIC",
            "-Xptxas",
            "-v",
            "-c",
        ])
        .args(&arch_flags)
        .args(if stem.ends_with("_sm90") {
            cutlass.as_slice()
        } else {
            &[]
        })
        .arg(src)
        .arg("-o")
        .arg(&obj);
        let output = cmd
            .output()
            .map_err(|e| format!("running {}: {e}", nvcc.display()))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            return Err(format!(
                "nvcc failed on {}:\n{}{stderr}",
                src.display(),
                String::from_utf8_lossy(&output.stdout)
            ));
        }
        report_ptxas(&stderr, verbose);
        objects.push(obj);
    }

    let lib = out_dir.join("libcandle_fused_kernels.a");
    let _ = std::fs::remove_file(&lib);
    let status = Command::new("ar")
        .arg("crs")
        .arg(&lib)
        .args(&objects)
        .status()
        .map_err(|e| format!("running ar: {e}"))?;
    if !status.success() {
        return Err(format!("ar failed to create {}", lib.display()));
    }

    println!("cargo:rustc-link-search=native={}", out_dir.display());
    println!("cargo:rustc-link-lib=static=candle_fused_kernels");
    if let Some(lib_dir) = cuda_lib_dir(&nvcc) {
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
    }
    println!("cargo:rustc-link-lib=dylib=cudart");
    println!("cargo:rustc-link-lib=dylib=stdc++");
    Ok(())
}

/// Spills that were measured and kept, as (a fragment of the kernel's mangled name, the most
/// bytes stored): the epilogue backward's, up to 16 bytes in the 16-bit instantiations without
/// a BatchNorm, whose two row loops ran faster than the builds without a spill, and up to 52 in
/// the 16-bit BatchNorm ones (the GELU's; 8-20 bytes for the other activations), whose blocks of
/// 1024 threads leave 64 registers a thread and ran faster than smaller blocks without a spill
/// (`cuda-kernels/backward.cu` says why).
const MEASURED_SPILLS: &[(&str, u32)] = &[("epilogue_backward_kernel", 52)];

/// Forwards ptxas's spill reports and warning C7510 (and, if asked, the whole report).
fn report_ptxas(stderr: &str, verbose: bool) {
    let mut function = "";
    for line in stderr.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            function = rest.split('\'').next().unwrap_or("");
        }
        let spills = line.contains("spill stores")
            && !line.contains(" 0 bytes spill stores, 0 bytes spill loads")
            && !is_measured_spill(function, line);
        if verbose || spills || line.contains("C7510") || line.contains("warning") {
            println!("cargo:warning={function}: {}", line.trim());
        }
    }
}

/// Whether `line`, ptxas's spill report for `function`, is one of `MEASURED_SPILLS`.
fn is_measured_spill(function: &str, line: &str) -> bool {
    let stored = line
        .split(" bytes spill stores")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|bytes| bytes.parse::<u32>().ok());
    stored.is_some_and(|bytes| {
        MEASURED_SPILLS
            .iter()
            .any(|&(kernel, most)| function.contains(kernel) && bytes <= most)
    })
}

fn find_nvcc() -> Result<PathBuf, String> {
    if let Some(nvcc) = std::env::var_os("NVCC") {
        return Ok(PathBuf::from(nvcc));
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = std::env::var_os(var) {
            let nvcc = Path::new(&root).join("bin").join("nvcc");
            if nvcc.is_file() {
                return Ok(nvcc);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let nvcc = dir.join("nvcc");
            if nvcc.is_file() {
                return Ok(nvcc);
            }
        }
    }
    Err("nvcc not found: set NVCC, or CUDA_ROOT/CUDA_PATH/CUDA_HOME to the toolkit, or put nvcc on PATH".into())
}

/// The extra flags of the `*_sm90.cu` files, the Hopper paths built on CUTLASS and CuTe:
/// none when sm_90a is not among the targets (the files then compile to stubs), else the
/// CUTLASS 4.2 headers from `CUTLASS_DIR` or the `nvidia-cutlass` Python wheel.
/// `CANDLE_FUSED_NO_SM90=1` builds without the Hopper path.
fn sm90_flags(arch_flags: &[String]) -> Result<Vec<String>, String> {
    let hopper = arch_flags.iter().any(|f| f.contains("sm_90a"));
    if !hopper || std::env::var("CANDLE_FUSED_NO_SM90").is_ok_and(|v| v == "1") {
        return Ok(Vec::new());
    }
    let root = match std::env::var_os("CUTLASS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => cutlass_from_wheel().ok_or(
            "the Hopper path needs the CUTLASS 4.2 headers: set CUTLASS_DIR to a CUTLASS checkout \
             (the directory holding include/cutlass), or `pip install nvidia-cutlass==4.2.0.0`; \
             or set CANDLE_FUSED_NO_SM90=1 to build only the portable kernels",
        )?,
    };
    let include = root.join("include");
    if !include.join("cutlass").join("cutlass.h").is_file() {
        return Err(format!(
            "CUTLASS_DIR={}: no include/cutlass/cutlass.h there",
            root.display()
        ));
    }
    Ok(vec![
        "-DFUSED_SM90".into(),
        "-DNDEBUG".into(),
        "--expt-relaxed-constexpr".into(),
        format!("-I{}", include.display()),
    ])
}

/// The headers inside the `nvidia-cutlass` wheel, if a `python3` on PATH has it installed.
fn cutlass_from_wheel() -> Option<PathBuf> {
    let output = Command::new("python3")
        .args([
            "-c",
            "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))",
        ])
        .output()
        .ok()?;
    let dir = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
    (output.status.success() && dir.is_dir()).then_some(dir)
}

/// `-gencode` flags for `CUDA_COMPUTE_CAP` (default 90).
fn arch_flags() -> Result<Vec<String>, String> {
    let caps = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let mut flags = Vec::new();
    for cap in caps.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let cap: u32 = cap.parse().map_err(|_| {
            format!("CUDA_COMPUTE_CAP={caps:?}: {cap:?} is not a number such as 80 or 90")
        })?;
        let flag = match cap {
            90 => "-gencode=arch=compute_90a,code=sm_90a".to_string(),
            // mma.sync with bf16 and cp.async need sm_80.
            80.. => format!("-gencode=arch=compute_{cap},code=sm_{cap}"),
            _ => {
                return Err(format!(
                    "CUDA_COMPUTE_CAP={caps}: compute capability {cap} is not supported (the kernels need 80 or newer)"
                ))
            }
        };
        flags.push(flag);
    }
    if flags.is_empty() {
        return Err(format!("CUDA_COMPUTE_CAP={caps:?} names no architecture"));
    }
    Ok(flags)
}

/// The toolkit's library directory (for `libcudart`), next to the `bin/` that holds nvcc.
fn cuda_lib_dir(nvcc: &Path) -> Option<PathBuf> {
    let root = nvcc.canonicalize().ok()?.parent()?.parent()?.to_path_buf();
    ["lib64", "lib", "targets/x86_64-linux/lib"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.join("libcudart.so").exists())
}
