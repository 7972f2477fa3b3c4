//! PyTorch checkpoints: a `config.json` and a `model.safetensors` holding a module's
//! `state_dict` with PyTorch's key names.
//!
//! ```json
//! {"model": "scale_batchnorm", "in_features": 8192, "out_features": 8192, "eps": 1e-5, "momentum": 0.1}
//! ```
//!
//! `model` is `swish_scale`, `scale_batchnorm` or `sigmoid_residual`. `scaling_factor` is
//! required by the first and last; `eps` (default `1e-5`) and `momentum` (default `0.1`; `null`
//! for PyTorch's cumulative average) belong to `scale_batchnorm`. The weights may instead be
//! split into shards named by a `model.safetensors.index.json` ([`WEIGHTS_INDEX_FILE`]). A
//! checkpoint is read from a directory ([`Checkpoint::from_dir`]) or from a Hugging Face Hub
//! cache ([`Checkpoint::from_hub_cache`]). Everything is validated before use: every key, shape
//! and dtype, and the config; each error names what is wrong and where.

use crate::nn::Model;
use candle_core::{bail, DType, Device, Result, Tensor, WithDType};
use candle_nn::{VarBuilder, VarMap};
use half::{bf16, f16};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// The file names inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// The weights file inside a checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a checkpoint whose weights are split into shards, read where
/// [`WEIGHTS_FILE`] is absent: `{"weight_map": {"<tensor>": "<shard file>", ...}}`, as
/// `huggingface_hub`'s `save_torch_state_dict` writes above its shard size (5 GB by default).
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// Which PyTorch module a checkpoint holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// `SwishScale`: Linear → `y * sigmoid(y)` → `* scaling_factor`.
    SwishScale,
    /// `ScaleBatchNorm`: Linear → `* scale` → BatchNorm1d.
    ScaleBatchNorm,
    /// `SigmoidResidual`: Linear → `sigmoid * scaling_factor + y`.
    SigmoidResidual,
}

impl ModelKind {
    /// The name used in `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::SwishScale => "swish_scale",
            ModelKind::ScaleBatchNorm => "scale_batchnorm",
            ModelKind::SigmoidResidual => "sigmoid_residual",
        }
    }

    /// The prefix of the linear layer's parameters in the `state_dict`.
    pub fn linear_prefix(self) -> &'static str {
        match self {
            ModelKind::SwishScale => "matmul",
            ModelKind::ScaleBatchNorm | ModelKind::SigmoidResidual => "gemm",
        }
    }
}

impl std::str::FromStr for ModelKind {
    type Err = candle_core::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "swish_scale" => ModelKind::SwishScale,
            "scale_batchnorm" => ModelKind::ScaleBatchNorm,
            "sigmoid_residual" => ModelKind::SigmoidResidual,
            other => bail!(
                "unknown model {other:?}: expected swish_scale, scale_batchnorm or sigmoid_residual"
            ),
        })
    }
}

/// A checkpoint's `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The module.
    pub kind: ModelKind,
    /// The linear layer's input features.
    pub in_features: usize,
    /// The linear layer's output features.
    pub out_features: usize,
    /// The constant factor of `swish_scale` and `sigmoid_residual`.
    pub scaling_factor: Option<f64>,
    /// BatchNorm's epsilon (`scale_batchnorm`).
    pub eps: f64,
    /// BatchNorm's momentum; `None` is the cumulative moving average (`scale_batchnorm`).
    pub momentum: Option<f64>,
}

/// PyTorch's BatchNorm defaults.
const DEFAULT_EPS: f64 = 1e-5;
const DEFAULT_MOMENTUM: f64 = 0.1;

impl ModelConfig {
    /// Parses and validates a `config.json` text; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| candle_core::Error::Msg(format!("{origin}: not valid JSON: {e}")))?;
        let Value::Object(fields) = value else {
            bail!("{origin}: expected a JSON object")
        };
        Self::from_fields(&fields).map_err(|e| candle_core::Error::Msg(format!("{origin}: {e}")))
    }

    fn from_fields(fields: &Map<String, Value>) -> Result<Self> {
        let kind: ModelKind = match fields.get("model") {
            Some(Value::String(s)) => s.parse()?,
            Some(other) => bail!("\"model\" must be a string, got {other}"),
            None => bail!("missing \"model\""),
        };
        let batch_norm = kind == ModelKind::ScaleBatchNorm;
        let allowed: &[&str] = if batch_norm {
            &["model", "in_features", "out_features", "eps", "momentum"]
        } else {
            &["model", "in_features", "out_features", "scaling_factor"]
        };
        if let Some(key) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
            bail!(
                "unexpected key {key:?} for model {}: allowed keys are {allowed:?}",
                kind.name()
            );
        }
        let size = |key: &str| -> Result<usize> {
            match fields.get(key) {
                Some(v) => match v.as_u64() {
                    Some(n) if n > 0 => Ok(n as usize),
                    _ => bail!("{key:?} must be a positive integer, got {v}"),
                },
                None => bail!("missing {key:?}"),
            }
        };
        let number = |key: &str| -> Result<Option<f64>> {
            match fields.get(key) {
                None => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(f) if f.is_finite() => Ok(Some(f)),
                    _ => bail!("{key:?} must be a finite number, got {v}"),
                },
            }
        };
        let scaling_factor = number("scaling_factor")?;
        if !batch_norm && scaling_factor.is_none() {
            bail!("missing \"scaling_factor\"");
        }
        let momentum = match fields.get("momentum") {
            Some(Value::Null) => None,
            _ => Some(number("momentum")?.unwrap_or(DEFAULT_MOMENTUM)),
        };
        let config = Self {
            kind,
            in_features: size("in_features")?,
            out_features: size("out_features")?,
            scaling_factor,
            eps: number("eps")?.unwrap_or(DEFAULT_EPS),
            momentum,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the values that [`to_json`](Self::to_json) writes for this kind of model, as
    /// [`from_json`](Self::from_json) would read them back: positive sizes whose weight can be
    /// addressed (`in_features · out_features` f64 values); a finite `scaling_factor` for
    /// `swish_scale` and `sigmoid_residual`, and none for `scale_batchnorm`, which has a positive
    /// finite `eps` and a `momentum` in `[0, 1]` or `None` (JSON has no NaN or infinity, which
    /// would be written as `null`). `eps` and `momentum` mean nothing to the other two models,
    /// which neither write nor read them.
    pub fn validate(&self) -> Result<()> {
        for (key, size) in [
            ("in_features", self.in_features),
            ("out_features", self.out_features),
        ] {
            if size == 0 {
                bail!("{key:?} must be a positive integer, got 0");
            }
        }
        let weight_bytes = self
            .in_features
            .checked_mul(self.out_features)
            .and_then(|elements| elements.checked_mul(std::mem::size_of::<f64>()));
        if weight_bytes.is_none_or(|bytes| bytes > isize::MAX as usize) {
            bail!(
                "a weight of \"out_features\" × \"in_features\" = {} × {} elements is too large to address",
                self.out_features,
                self.in_features
            );
        }
        if self.kind == ModelKind::ScaleBatchNorm {
            if let Some(f) = self.scaling_factor {
                bail!("scale_batchnorm takes no \"scaling_factor\", got {f}");
            }
        } else {
            return match self.scaling_factor {
                Some(f) if f.is_finite() => Ok(()),
                Some(f) => bail!("\"scaling_factor\" must be a finite number, got {f}"),
                None => bail!("missing \"scaling_factor\""),
            };
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            bail!("\"eps\" must be positive and finite, got {}", self.eps);
        }
        crate::ops::check_eps(self.eps)
            .map_err(|e| candle_core::Error::Msg(format!("\"eps\": {e}")))?;
        match self.momentum {
            Some(m) if !(0.0..=1.0).contains(&m) => {
                bail!("\"momentum\" must be in [0, 1] or null, got {m}")
            }
            _ => Ok(()),
        }
    }

    /// The config as `config.json` text.
    pub fn to_json(&self) -> String {
        let mut fields = Map::new();
        fields.insert("model".into(), self.kind.name().into());
        fields.insert("in_features".into(), self.in_features.into());
        fields.insert("out_features".into(), self.out_features.into());
        if self.kind == ModelKind::ScaleBatchNorm {
            fields.insert("eps".into(), self.eps.into());
            fields.insert(
                "momentum".into(),
                self.momentum.map_or(Value::Null, Value::from),
            );
        } else if let Some(f) = self.scaling_factor {
            fields.insert("scaling_factor".into(), f.into());
        }
        serde_json::to_string_pretty(&Value::Object(fields)).expect("a JSON object serialises")
    }

    /// Every tensor of the model's `state_dict`: name, shape, and whether it holds floats
    /// (else int64).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>, bool)> {
        let (i, o) = (self.in_features, self.out_features);
        let p = self.kind.linear_prefix();
        let mut tensors = vec![
            (format!("{p}.weight"), vec![o, i], true),
            (format!("{p}.bias"), vec![o], true),
        ];
        if self.kind == ModelKind::ScaleBatchNorm {
            for name in [
                "scale",
                "bn.weight",
                "bn.bias",
                "bn.running_mean",
                "bn.running_var",
            ] {
                tensors.push((name.to_string(), vec![o], true));
            }
            tensors.push(("bn.num_batches_tracked".to_string(), vec![], false));
        }
        tensors
    }
}

/// A validated checkpoint: its config and its tensors (on the CPU, as stored).
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The parsed `config.json`.
    pub config: ModelConfig,
    /// The `state_dict`, by PyTorch key name.
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Reads `DIR/config.json` and `DIR/model.safetensors`, or the shards that
    /// `DIR/model.safetensors.index.json` names where the single file is absent.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            let why = match std::fs::metadata(dir) {
                Ok(_) => "is not a directory".to_string(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist".to_string(),
                Err(e) => format!("cannot be read: {e}"),
            };
            bail!("checkpoint directory {} {why}", dir.display());
        }
        let (single, index) = (dir.join(WEIGHTS_FILE), dir.join(WEIGHTS_INDEX_FILE));
        let weights = if !single.exists() && index.exists() {
            index
        } else {
            single
        };
        Self::from_files(&dir.join(CONFIG_FILE), &weights)
    }

    /// Reads a checkpoint of the Hugging Face Hub model repo `repo_id` at `revision` (a branch,
    /// tag or commit; default `main`) from the local cache `cache` (see [`hf_hub::Cache`]).
    /// Nothing is downloaded: fetch the repo first (e.g. `huggingface-cli download REPO`).
    pub fn from_hub_cache(
        cache: &hf_hub::Cache,
        repo_id: &str,
        revision: Option<&str>,
    ) -> Result<Self> {
        Self::from_dir(hub_snapshot(cache, repo_id, revision)?)
    }

    /// The directory that holds the checkpoint at `location`: `location` itself if it is a
    /// directory (a leading `~/` standing for `HOME`), else the snapshot folder of a Hub repo id
    /// (`owner/name`, optionally `owner/name@revision`) in the default cache, which holds the
    /// repo's other files too. The default cache is where `huggingface_hub` puts it:
    /// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else
    /// `~/.cache/huggingface/hub`.
    pub fn locate(location: &str) -> Result<PathBuf> {
        // A leading `~/` is the home directory, as a shell would read it.
        let home = std::env::var_os("HOME").filter(|h| !h.is_empty());
        if let (Some(rest), Some(home)) = (location.strip_prefix("~/"), home) {
            return Ok(PathBuf::from(home).join(rest));
        }
        let looks_like_path = location.starts_with(['.', '/', '~']) || location.ends_with('/');
        if looks_like_path || Path::new(location).is_dir() {
            return Ok(PathBuf::from(location));
        }
        let (repo_id, revision) = match location.split_once('@') {
            Some((id, rev)) => (id, Some(rev)),
            None => (location, None),
        };
        if repo_id.split('/').count() != 2 || repo_id.split('/').any(str::is_empty) {
            bail!("{location} is neither a checkpoint directory nor a Hub repo id (owner/name)");
        }
        default_hub_cache()
            .and_then(|cache| hub_snapshot(&cache, repo_id, revision))
            .map_err(|e| {
                candle_core::Error::Msg(format!(
                    "{location} is not a directory here, and as a Hub repo id: {e}"
                ))
            })
    }

    /// The checkpoint at `location` (see [`Checkpoint::locate`]), read by
    /// [`Checkpoint::from_dir`].
    pub fn open(location: &str) -> Result<Self> {
        Self::from_dir(Self::locate(location)?)
    }

    /// Reads and validates a config file and the weights: a safetensors file, or an index
    /// (a file named `*.index.json`, see [`WEIGHTS_INDEX_FILE`]) whose shards lie beside it.
    /// Every header is checked against the config before any tensor is read, and each tensor
    /// is read straight into its own storage: loading holds the weights in memory once.
    pub fn from_files(config_path: &Path, weights_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(config_path).map_err(|e| {
            candle_core::Error::Msg(format!("cannot read {}: {e}", config_path.display()))
        })?;
        let config = ModelConfig::from_json(&text, &config_path.display().to_string())?;
        let tensors = read_weights(weights_path, &config)?;
        Ok(Self { config, tensors })
    }

    /// A builder that reads the checkpoint's tensors, converted to `dtype` on `device`
    /// (`num_batches_tracked` stays int64). For inference.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), dtype, device)
    }

    /// The checkpoint's tensors as trainable variables in `dtype` on `device`, under their
    /// PyTorch names, for [`VarBuilder::from_varmap`] and candle-nn's optimizers.
    pub fn var_map(&self, dtype: DType, device: &Device) -> Result<VarMap> {
        let map = VarMap::new();
        {
            let mut vars = map
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("VarMap poisoned".into()))?;
            for (name, t) in &self.tensors {
                let dtype = if t.dtype() == DType::I64 {
                    DType::I64
                } else {
                    dtype
                };
                vars.insert(
                    name.clone(),
                    candle_core::Var::from_tensor(&t.to_device(device)?.to_dtype(dtype)?)?,
                );
            }
        }
        Ok(map)
    }

    /// The model, for inference, in `dtype` on `device`.
    pub fn load_model(&self, dtype: DType, device: &Device) -> Result<Model> {
        Model::load(self.var_builder(dtype, device), &self.config)
    }

    /// Writes `config.json` and `model.safetensors` (floats as f32, counters as int64) into
    /// `dir`, creating it, in the layout [`Checkpoint::from_dir`] reads and PyTorch's
    /// `load_state_dict` accepts. The config ([`ModelConfig::validate`]) and the tensors (each
    /// name once, against the config, in the dtypes given) are checked first, so nothing is
    /// written that would not load back: as it was, up to the rounding of f64 values to f32.
    /// Each file is written beside its final name and then renamed over it, the weights first,
    /// so a save that fails on the way leaves the directory's previous checkpoint whole.
    pub fn save(
        dir: impl AsRef<Path>,
        config: &ModelConfig,
        tensors: &[(String, Tensor)],
    ) -> Result<()> {
        let dir = dir.as_ref();
        let cannot_save =
            |e: &dyn std::fmt::Display| format!("cannot save to {}: {e}", dir.display());
        config
            .validate()
            .map_err(|e| candle_core::Error::Msg(cannot_save(&e)))?;
        let mut entries = HashMap::new();
        for (name, t) in tensors {
            if entries.insert(name.clone(), StoredTensor::of(t)).is_some() {
                bail!(
                    "{}",
                    cannot_save(&format!("the tensor {name:?} is given twice"))
                );
            }
        }
        check_tensors(config, &entries)?;
        let mut stored = HashMap::new();
        for (name, t) in tensors {
            let t = t.to_device(&Device::Cpu)?;
            let t = if t.dtype() == DType::I64 {
                t
            } else {
                t.to_dtype(DType::F32)?
            };
            stored.insert(name.as_str(), t);
        }
        let weights = safetensors::serialize(&stored, None)
            .map_err(|e| candle_core::Error::Msg(cannot_save(&e)))?;
        std::fs::create_dir_all(dir).map_err(|e| {
            candle_core::Error::Msg(format!("cannot create {}: {e}", dir.display()))
        })?;
        write_by_rename(&dir.join(WEIGHTS_FILE), &weights)?;
        write_by_rename(&dir.join(CONFIG_FILE), (config.to_json() + "\n").as_bytes())
    }
}

/// Writes `bytes` to `path` through a file beside it that is then renamed over it, so that
/// `path` holds either its old content or all of the new; the error names `path`.
fn write_by_rename(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    std::fs::write(&partial, bytes)
        .and_then(|()| std::fs::rename(&partial, path))
        .map_err(|e| {
            // Best effort: the partial file may not exist.
            let _ = std::fs::remove_file(&partial);
            candle_core::Error::Msg(format!("cannot write {}: {e}", path.display()))
        })
}

/// A tensor as a weights file's header describes it, or as [`Checkpoint::save`] is handed
/// it: what [`check_tensors`] compares with the `state_dict` that a config describes.
struct StoredTensor {
    shape: Vec<usize>,
    /// The dtype's name, for errors.
    dtype: String,
    kind: StoredKind,
}

/// What a stored dtype can hold of a `state_dict`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StoredKind {
    /// f16, bf16, f32 or f64: a parameter or a running statistic.
    Float,
    /// int64: `num_batches_tracked`.
    Int64,
    /// Anything else.
    Other,
}

impl StoredKind {
    fn of(dtype: DType) -> Self {
        match dtype {
            DType::F16 | DType::BF16 | DType::F32 | DType::F64 => StoredKind::Float,
            DType::I64 => StoredKind::Int64,
            _ => StoredKind::Other,
        }
    }
}

impl StoredTensor {
    fn of(t: &Tensor) -> Self {
        Self {
            shape: t.dims().to_vec(),
            dtype: format!("{:?}", t.dtype()),
            kind: StoredKind::of(t.dtype()),
        }
    }

    fn from_header(info: &TensorInfo) -> Self {
        // A stored dtype that Candle has no type for holds nothing of a state_dict.
        let kind = DType::try_from(info.dtype).map_or(StoredKind::Other, StoredKind::of);
        Self {
            shape: info.shape.clone(),
            dtype: format!("{:?}", info.dtype),
            kind,
        }
    }
}

/// The Hub cache that `huggingface_hub` uses, from the environment (see [`Checkpoint::locate`]);
/// an error, not a panic, where no home directory is known.
fn default_hub_cache() -> Result<hf_hub::Cache> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let path = if let Some(hub) = var("HF_HUB_CACHE") {
        hub
    } else if let Some(home) = var("HF_HOME") {
        home.join("hub")
    } else if let Some(cache) = var("XDG_CACHE_HOME") {
        cache.join("huggingface").join("hub")
    } else if let Some(home) = var("HOME").or_else(|| var("USERPROFILE")) {
        home.join(".cache").join("huggingface").join("hub")
    } else {
        bail!("no Hub cache: none of HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME and HOME is set")
    };
    Ok(hf_hub::Cache::new(path))
}

/// The snapshot folder of the Hub model repo `repo_id` at `revision` (default `main`) in
/// `cache`, once it holds a config and weights; nothing is downloaded.
fn hub_snapshot(cache: &hf_hub::Cache, repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let revision = revision.unwrap_or("main");
    let repo = cache.repo(hf_hub::Repo::with_revision(
        repo_id.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    ));
    // The Hub's cache keeps `refs/` for branches and tags only: a commit names its snapshot
    // directly.
    let is_commit = revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit());
    let snapshot = |name: &str| {
        let folder = hf_hub::Repo::model(repo_id.to_string()).folder_name();
        let path = cache
            .path()
            .join(folder)
            .join("snapshots")
            .join(revision)
            .join(name);
        (is_commit && path.is_file()).then_some(path)
    };
    let file = |name: &str| repo.get(name).or_else(|| snapshot(name));
    let missing = |what: &str| {
        candle_core::Error::Msg(format!(
            "{what} of {repo_id} (revision {revision}) is not in the Hugging Face cache at {}; download the repo first",
            cache.path().display()
        ))
    };
    let config = file(CONFIG_FILE).ok_or_else(|| missing(CONFIG_FILE))?;
    // A sharded checkpoint's shards lie beside its index in the snapshot.
    if file(WEIGHTS_FILE)
        .or_else(|| file(WEIGHTS_INDEX_FILE))
        .is_none()
    {
        return Err(missing(&format!(
            "{WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE})"
        )));
    }
    match config.parent() {
        Some(dir) => Ok(dir.to_path_buf()),
        None => bail!("{} has no parent directory", config.display()),
    }
}

/// Checks that `tensors` is exactly the `state_dict` that `config` describes.
fn check_tensors(config: &ModelConfig, tensors: &HashMap<String, StoredTensor>) -> Result<()> {
    let expected = config.expected_tensors();
    for (name, shape, float) in &expected {
        let Some(t) = tensors.get(name) else {
            bail!(
                "missing tensor {name:?} (expected shape {shape:?}) for model {}",
                config.kind.name()
            )
        };
        if t.shape != *shape {
            bail!(
                "tensor {name:?} has shape {:?}, expected {shape:?} (in_features {}, out_features {})",
                t.shape,
                config.in_features,
                config.out_features
            );
        }
        let (want_kind, want) = if *float {
            (StoredKind::Float, "a float dtype (F16, BF16, F32 or F64)")
        } else {
            (StoredKind::Int64, "int64")
        };
        if t.kind != want_kind {
            bail!("tensor {name:?} has dtype {}, expected {want}", t.dtype);
        }
    }
    let mut extra: Vec<&String> = tensors
        .keys()
        .filter(|k| !expected.iter().any(|(name, _, _)| name == *k))
        .collect();
    extra.sort();
    if let Some(name) = extra.first() {
        bail!(
            "unexpected tensor {name:?} for model {} (expected exactly {:?})",
            config.kind.name(),
            expected
                .iter()
                .map(|(n, _, _)| n.as_str())
                .collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// The largest safetensors header accepted, as the `safetensors` crate's own limit.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Bytes converted per read: enough to stream at the disk's speed, small beside a weight.
const READ_CHUNK_BYTES: usize = 1 << 22;

/// Reads the `state_dict` in the weights at `path` (a safetensors file, or an index of shards)
/// after checking every header against `config`. Each tensor is read into its own storage in
/// one pass over its file, so loading holds the weights once; reading a whole file first and
/// converting it would hold them twice (8.6 GB for SwishScale's f32 weight at its reference
/// size).
fn read_weights(path: &Path, config: &ModelConfig) -> Result<HashMap<String, Tensor>> {
    let is_index = path
        .file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.ends_with(".index.json"));
    let files = if is_index {
        open_shards(path)?
    } else {
        vec![WeightsFile::open(path)?]
    };
    let entries = files
        .iter()
        .flat_map(|f| f.metadata.tensors())
        .map(|(name, info)| (name, StoredTensor::from_header(info)))
        .collect();
    check_tensors(config, &entries)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    let mut tensors = HashMap::new();
    for file in files {
        tensors.extend(file.read_tensors()?);
    }
    Ok(tensors)
}

/// A safetensors index: which shard holds each tensor.
#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// Opens the shards that the index at `index_path` names, each beside it, and checks that
/// each holds exactly the tensors that the index assigns to it (so no tensor is in two).
fn open_shards(index_path: &Path) -> Result<Vec<WeightsFile>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| {
        candle_core::Error::Msg(format!("cannot read {}: {e}", index_path.display()))
    })?;
    let index: ShardIndex = serde_json::from_str(&text).map_err(|e| {
        candle_core::Error::Msg(format!(
            "{} is not a safetensors index (a JSON object whose \"weight_map\" maps tensor names to shard files): {e}",
            index_path.display()
        ))
    })?;
    let mut assigned: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (tensor, shard) in &index.weight_map {
        assigned.entry(shard).or_default().push(tensor);
    }
    let dir = index_path.parent().unwrap_or(Path::new(""));
    let mut shards = Vec::with_capacity(assigned.len());
    for (shard, mut names) in assigned {
        let mut parts = Path::new(shard).components();
        if !matches!(
            (parts.next(), parts.next()),
            (Some(Component::Normal(_)), None)
        ) {
            bail!(
                "{}: shard {shard:?} is not a file name (shards lie beside the index)",
                index_path.display()
            );
        }
        let file = WeightsFile::open(&dir.join(shard))?;
        let mut held = file.metadata.offset_keys();
        held.sort();
        names.sort();
        if held != names {
            bail!(
                "{}: the index assigns {names:?} to {shard}, which holds {held:?}",
                index_path.display()
            );
        }
        shards.push(file);
    }
    Ok(shards)
}

/// A safetensors file whose header has been read and validated, positioned at its first
/// tensor.
struct WeightsFile {
    path: PathBuf,
    file: File,
    metadata: Metadata,
}

impl WeightsFile {
    /// Opens `path` and reads its header, checking it against the file's size.
    fn open(path: &Path) -> Result<Self> {
        let cannot_read = |e: std::io::Error| {
            candle_core::Error::Msg(format!("cannot read {}: {e}", path.display()))
        };
        let invalid = |why: String| {
            candle_core::Error::Msg(format!(
                "{} is not a valid safetensors file (truncated or corrupt?): {why}",
                path.display()
            ))
        };
        let mut file = File::open(path).map_err(cannot_read)?;
        let file_len = file.metadata().map_err(cannot_read)?.len();

        // The layout: an 8-byte little-endian header length, the JSON header, then the
        // tensors' bytes back to back.
        if file_len < 8 {
            return Err(invalid(format!(
                "{file_len} bytes, too few for the header's length"
            )));
        }
        let mut length_prefix = [0u8; 8];
        file.read_exact(&mut length_prefix).map_err(cannot_read)?;
        let header_len = u64::from_le_bytes(length_prefix);
        if header_len > MAX_HEADER_BYTES || header_len > file_len - 8 {
            return Err(invalid(format!(
                "a header of {header_len} bytes in a file of {file_len}"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(cannot_read)?;
        // Deserialising validates the offsets: the tensors tile the data with neither gap nor
        // overlap, each as long as its shape and dtype make it.
        let metadata: Metadata =
            serde_json::from_slice(&header).map_err(|e| invalid(format!("header: {e}")))?;
        let data_len = file_len - 8 - header_len;
        if metadata.data_len() as u64 != data_len {
            return Err(invalid(format!(
                "the header describes {} bytes of tensor data, the file holds {data_len}",
                metadata.data_len()
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            metadata,
        })
    }

    /// Reads every tensor, in the order they lie in the file.
    fn read_tensors(mut self) -> Result<HashMap<String, Tensor>> {
        let mut tensors = HashMap::new();
        for name in self.metadata.offset_keys() {
            let Some(info) = self.metadata.info(&name) else {
                bail!(
                    "{}: the header lists {name:?} without its dtype and shape",
                    self.path.display()
                )
            };
            let tensor = read_tensor(&mut self.file, info).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "cannot read tensor {name:?} from {}: {e}",
                    self.path.display()
                ))
            })?;
            tensors.insert(name, tensor);
        }
        Ok(tensors)
    }
}

/// Reads the tensor that `info` describes from `reader`, positioned at its first byte.
fn read_tensor(reader: &mut impl Read, info: &TensorInfo) -> Result<Tensor> {
    let shape = info.shape.clone();
    match info.dtype {
        Dtype::F16 => read_elements(reader, shape, f16::from_le_bytes),
        Dtype::BF16 => read_elements(reader, shape, bf16::from_le_bytes),
        Dtype::F32 => read_elements(reader, shape, f32::from_le_bytes),
        Dtype::F64 => read_elements(reader, shape, f64::from_le_bytes),
        Dtype::I64 => read_elements(reader, shape, i64::from_le_bytes),
        // `check_tensors` refuses every other dtype before anything is read.
        other => bail!("dtype {other:?} is not read"),
    }
}

/// Reads a tensor of `shape` whose elements are `N` little-endian bytes each, converting a
/// chunk at a time into the tensor's own vector.
fn read_elements<T: WithDType, const N: usize>(
    reader: &mut impl Read,
    shape: Vec<usize>,
    from_le_bytes: fn([u8; N]) -> T,
) -> Result<Tensor> {
    let count: usize = shape.iter().product();
    let mut elements = Vec::with_capacity(count);
    let mut chunk = vec![0u8; (READ_CHUNK_BYTES / N).min(count) * N];
    while elements.len() < count {
        let take = (count - elements.len()).min(chunk.len() / N);
        let bytes = &mut chunk[..take * N];
        reader.read_exact(bytes)?;
        elements.extend(bytes.chunks_exact(N).map(|b| {
            let mut element = [0u8; N];
            element.copy_from_slice(b);
            from_le_bytes(element)
        }));
    }
    Tensor::from_vec(elements, shape, &Device::Cpu)
}
