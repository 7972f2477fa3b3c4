//! Loading PyTorch checkpoints: the shipped models, a Hugging Face Hub cache laid out offline,
//! corrupted files and configs (each error names the key, tensor or file), saving, and training
//! through a `VarMap` (BatchNorm's running statistics included).

mod common;
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_fused::checkpoint::{CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE};
use candle_fused::parity::{compare, forward_backward, tolerance, GradientPath};
use candle_fused::{Checkpoint, Model, ModelConfig, ModelKind};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use common::{add_files_to_hub_cache, assert_err, golden, shipped, to_f64};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

const MODELS: [&str; 3] = ["swish_scale", "scale_batchnorm", "sigmoid_residual"];
/// A commit hash for the Hub cache layouts.
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A directory under the system temp dir, unique to this process and call, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "candle-fused-test-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The golden input batch of a shipped model.
fn input(name: &str) -> Tensor {
    golden(name).remove("x").unwrap()
}

fn config_fields(name: &str) -> Map<String, Value> {
    let text = std::fs::read_to_string(shipped(name).join(CONFIG_FILE)).unwrap();
    match serde_json::from_str(&text).unwrap() {
        Value::Object(fields) => fields,
        other => panic!("{name}: config is not an object: {other}"),
    }
}

fn weights(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(shipped(name).join(WEIGHTS_FILE), &Device::Cpu).unwrap()
}

/// Writes `config` and `tensors` as a checkpoint directory `dir`.
fn write_checkpoint(dir: &Path, config: &str, tensors: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), config).unwrap();
    candle_core::safetensors::save(tensors, dir.join(WEIGHTS_FILE)).unwrap();
}

/// A copy of shipped model `name` in `dir`, its config and tensors edited first.
fn variant(
    name: &str,
    dir: &Path,
    edit_config: impl FnOnce(&mut Map<String, Value>),
    edit_tensors: impl FnOnce(&mut HashMap<String, Tensor>),
) -> PathBuf {
    let mut fields = config_fields(name);
    edit_config(&mut fields);
    let mut tensors = weights(name);
    edit_tensors(&mut tensors);
    write_checkpoint(dir, &Value::Object(fields).to_string(), &tensors);
    dir.to_path_buf()
}

/// Copies the two checkpoint files of shipped model `name` into `dir`.
fn copy_shipped(name: &str, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        std::fs::copy(shipped(name).join(file), dir.join(file)).unwrap();
    }
}

/// The eval-mode output of a checkpoint's model on the golden input of `name`.
fn eval_output(ckpt: &Checkpoint, name: &str) -> Vec<Vec<f32>> {
    let model = ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
    model
        .forward_t(&input(name), false)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// `max |a - b| / max(1, max |b|)`.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    diff / b.iter().fold(1.0f64, |m, v| m.max(v.abs()))
}

#[test]
fn shipped_checkpoints_load_and_match_their_goldens() {
    for name in MODELS {
        let ckpt = Checkpoint::from_dir(shipped(name)).unwrap();
        assert_eq!(ckpt.config.kind.name(), name);
        let expected: Vec<String> = ckpt
            .config
            .expected_tensors()
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        let mut names: Vec<&String> = ckpt.tensors.keys().collect();
        names.sort();
        let mut want: Vec<&String> = expected.iter().collect();
        want.sort();
        assert_eq!(names, want, "{name}");

        // Checkpoint::open on a directory reads the same checkpoint.
        let opened = Checkpoint::open(shipped(name).to_str().unwrap()).unwrap();
        assert_eq!(opened.config, ckpt.config);
        for (key, t) in &ckpt.tensors {
            assert_eq!(to_f64(t), to_f64(&opened.tensors[key]), "{name}: {key}");
        }

        // Both modes agree with PyTorch's float64 goldens. The inference model gives the
        // outputs (and in train mode the buffers); through a VarMap the gradients too. Each
        // model is loaded afresh for each mode (a train-mode forward updates the buffers).
        let golden = golden(name);
        let tol = tolerance(DType::F32, false);
        for train in [false, true] {
            let model = ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
            let outputs =
                forward_backward(&model, &golden["x"], None, train, GradientPath::Autograd)
                    .unwrap();
            let expected = if name == "scale_batchnorm" && train {
                4
            } else {
                1
            };
            assert_eq!(outputs.len(), expected, "{name}");
            for c in compare(&outputs, &golden, train, tol, false).unwrap() {
                assert!(c.ok, "{name} (train {train}, inference): {c:?}");
            }
            let map = ckpt.var_map(DType::F32, &Device::Cpu).unwrap();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
            let model = Model::load(vb, &ckpt.config).unwrap();
            let outputs = forward_backward(
                &model,
                &golden["x"],
                Some(&golden["g"]),
                train,
                GradientPath::Autograd,
            )
            .unwrap();
            // y, grad.x and one gradient per parameter.
            assert!(outputs.len() >= 2 + model.parameters().len(), "{name}");
            for c in compare(&outputs, &golden, train, tol, false).unwrap() {
                assert!(c.ok, "{name} (train {train}, VarMap): {c:?}");
            }
        }
    }
}

#[test]
fn open_rejects_what_is_neither_a_directory_nor_a_repo_id() {
    let tmp = TempDir::new("open");
    let missing = tmp.path().join("no-such-checkpoint");
    let missing = missing.to_str().unwrap();
    // What looks like a path is read as a directory, and reported as one.
    for path in [missing, "./no-such-checkpoint", "org/"] {
        assert_err(
            Checkpoint::open(path),
            &[path, "checkpoint directory", "does not exist"],
        );
    }
    for bad in ["just-a-name", "a/b/c", "org//name"] {
        assert_err(
            Checkpoint::open(bad),
            &[bad, "neither a checkpoint directory nor a Hub repo id"],
        );
    }
}

/// Lays out Hub cache entries under `cache`: repo `repo_id` with a snapshot `commit` holding a
/// copy of shipped model `name`, and `refs/<reference>` naming the commit (if given).
fn add_to_hub_cache(
    cache: &Path,
    repo_id: &str,
    commit: &str,
    name: &str,
    reference: Option<&str>,
) {
    let files = [CONFIG_FILE, WEIGHTS_FILE];
    add_files_to_hub_cache(cache, repo_id, commit, &shipped(name), &files, reference);
}

#[test]
fn hub_cache_loads_offline_by_branch_tag_and_commit() {
    let tmp = TempDir::new("hub");
    let other_commit = "fedcba9876543210fedcba9876543210fedcba98";
    add_to_hub_cache(tmp.path(), "org/name", COMMIT, "swish_scale", Some("main"));
    add_to_hub_cache(
        tmp.path(),
        "org/name",
        other_commit,
        "sigmoid_residual",
        Some("v1"),
    );
    let cache = hf_hub::Cache::new(tmp.path().to_path_buf());

    let from_dir = Checkpoint::from_dir(shipped("swish_scale")).unwrap();
    let want = eval_output(&from_dir, "swish_scale");
    for revision in [None, Some("main"), Some(COMMIT)] {
        let ckpt = Checkpoint::from_hub_cache(&cache, "org/name", revision)
            .unwrap_or_else(|e| panic!("revision {revision:?}: {e}"));
        assert_eq!(ckpt.config, from_dir.config, "revision {revision:?}");
        assert_eq!(
            eval_output(&ckpt, "swish_scale"),
            want,
            "revision {revision:?}"
        );
    }
    // Another reference resolves to its own snapshot.
    for revision in ["v1", other_commit] {
        let ckpt = Checkpoint::from_hub_cache(&cache, "org/name", Some(revision)).unwrap();
        assert_eq!(ckpt.config.kind, ModelKind::SigmoidResidual);
        let from_dir = Checkpoint::from_dir(shipped("sigmoid_residual")).unwrap();
        assert_eq!(
            eval_output(&ckpt, "sigmoid_residual"),
            eval_output(&from_dir, "sigmoid_residual")
        );
    }

    // What the cache does not have is an error naming the repo and the revision.
    assert_err(
        Checkpoint::from_hub_cache(&cache, "org/name", Some("v2")),
        &["org/name", "revision v2", "not in the Hugging Face cache"],
    );
    let absent_commit = "1111111111111111111111111111111111111111";
    assert_err(
        Checkpoint::from_hub_cache(&cache, "org/name", Some(absent_commit)),
        &["org/name", absent_commit, "not in the Hugging Face cache"],
    );
    assert_err(
        Checkpoint::from_hub_cache(&cache, "org/absent", None),
        &[
            "org/absent",
            "revision main",
            "not in the Hugging Face cache",
        ],
    );
    // A snapshot without its weights names the missing file.
    add_to_hub_cache(
        tmp.path(),
        "org/partial",
        COMMIT,
        "swish_scale",
        Some("main"),
    );
    let partial = tmp
        .path()
        .join("models--org--partial/snapshots")
        .join(COMMIT)
        .join(WEIGHTS_FILE);
    std::fs::remove_file(partial).unwrap();
    assert_err(
        Checkpoint::from_hub_cache(&cache, "org/partial", None),
        &[WEIGHTS_FILE, "org/partial", "not in the Hugging Face cache"],
    );
}

/// The variables that choose the default Hub cache, in `huggingface_hub`'s order.
const CACHE_VARS: [&str; 5] = [
    "HF_HUB_CACHE",
    "HF_HOME",
    "XDG_CACHE_HOME",
    "HOME",
    "USERPROFILE",
];

/// Runs `f` with the cache variables set as `vars` gives them (the others unset), then
/// restores them.
fn with_cache_vars<R>(vars: &[(&str, &Path)], f: impl FnOnce() -> R) -> R {
    let saved: Vec<_> = CACHE_VARS
        .iter()
        .map(|name| (name, std::env::var_os(name)))
        .collect();
    for name in CACHE_VARS {
        std::env::remove_var(name);
    }
    for (name, value) in vars {
        std::env::set_var(name, value);
    }
    let result = f();
    for (name, value) in saved {
        match value {
            Some(value) => std::env::set_var(name, value),
            None => std::env::remove_var(name),
        }
    }
    result
}

/// The only test that touches the cache's environment variables (the environment is
/// process-wide).
#[test]
fn open_finds_repo_ids_in_the_cache_under_hf_home() {
    let tmp = TempDir::new("hf-home");
    add_to_hub_cache(
        &tmp.path().join("hub"),
        "org/name",
        COMMIT,
        "scale_batchnorm",
        Some("main"),
    );
    let results = with_cache_vars(&[("HF_HOME", tmp.path())], || {
        (
            Checkpoint::open("org/name"),
            Checkpoint::open(&format!("org/name@{COMMIT}")),
            Checkpoint::open("org/name@v9"),
            Checkpoint::open("org/absent"),
            Checkpoint::locate("org/name"),
        )
    });
    // HF_HUB_CACHE names the cache itself and comes first; without any of the variables there
    // is no cache to look in, which is an error.
    let elsewhere = tmp.path().join("elsewhere");
    let hub_cache = with_cache_vars(
        &[
            ("HF_HUB_CACHE", &tmp.path().join("hub")),
            ("HF_HOME", &elsewhere),
        ],
        || Checkpoint::locate("org/name"),
    );
    let under_home = with_cache_vars(&[("HOME", &elsewhere)], || Checkpoint::locate("org/name"));
    // A leading `~/` is HOME, as a shell would expand it.
    let tilde = with_cache_vars(&[("HOME", tmp.path())], || Checkpoint::locate("~/hub"));
    assert_eq!(tilde.unwrap(), tmp.path().join("hub"));
    let no_cache = with_cache_vars(&[], || Checkpoint::locate("org/name"));
    let snapshot = tmp
        .path()
        .join("hub/models--org--name/snapshots")
        .join(COMMIT);
    assert_eq!(hub_cache.unwrap(), snapshot);
    let home_hub = elsewhere.join(".cache/huggingface/hub");
    assert_err(under_home, &[home_hub.to_str().unwrap()]);
    assert_err(no_cache, &["org/name", "no Hub cache", "HF_HUB_CACHE"]);
    let from_dir = Checkpoint::from_dir(shipped("scale_batchnorm")).unwrap();
    let want = eval_output(&from_dir, "scale_batchnorm");
    for ckpt in [results.0.unwrap(), results.1.unwrap()] {
        assert_eq!(ckpt.config, from_dir.config);
        assert_eq!(eval_output(&ckpt, "scale_batchnorm"), want);
    }
    let hub = tmp.path().join("hub");
    let hub = hub.to_str().unwrap();
    assert_err(results.2, &["org/name", "revision v9", hub]);
    assert_err(
        results.3,
        &["org/absent is not a directory here", "revision main", hub],
    );
    // The repo's snapshot, where its other files (a golden, say) lie too.
    assert_eq!(results.4.unwrap(), snapshot);
}

/// The shard files of [`write_sharded`].
const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

/// Writes shipped model `name` into `dir` as a sharded checkpoint, in the layout of
/// `huggingface_hub`'s `save_torch_state_dict`: the tensors (after `edit_tensors`), sorted by
/// name, split between two shards, and an index whose `weight_map` `edit_map` may change.
fn write_sharded(
    name: &str,
    dir: &Path,
    edit_tensors: impl FnOnce(&mut HashMap<String, Tensor>),
    edit_map: impl FnOnce(&mut Map<String, Value>),
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(shipped(name).join(CONFIG_FILE), dir.join(CONFIG_FILE)).unwrap();
    let mut tensors = weights(name);
    edit_tensors(&mut tensors);
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    let mut weight_map = Map::new();
    let mut total_size = 0;
    for (shard, part) in SHARDS.iter().zip(names.chunks(names.len().div_ceil(2))) {
        let held: HashMap<String, Tensor> = part
            .iter()
            .map(|name| (name.clone(), tensors[name].clone()))
            .collect();
        for (name, t) in &held {
            weight_map.insert(name.clone(), Value::from(*shard));
            total_size += t.elem_count() * t.dtype().size_in_bytes();
        }
        candle_core::safetensors::save(&held, dir.join(shard)).unwrap();
    }
    edit_map(&mut weight_map);
    let index = serde_json::json!({
        "metadata": {"total_size": total_size},
        "weight_map": weight_map,
    });
    std::fs::write(dir.join(WEIGHTS_INDEX_FILE), index.to_string()).unwrap();
}

/// Every tensor of a checkpoint as its dtype and f64 values, by name.
fn tensor_values(ckpt: &Checkpoint) -> HashMap<String, (DType, Vec<f64>)> {
    ckpt.tensors
        .iter()
        .map(|(name, t)| (name.clone(), (t.dtype(), to_f64(t))))
        .collect()
}

#[test]
fn sharded_checkpoints_load_like_single_files() {
    let tmp = TempDir::new("sharded");
    for name in MODELS {
        let dir = tmp.path().join(name);
        write_sharded(name, &dir, |_| {}, |_| {});
        assert!(!dir.join(WEIGHTS_FILE).exists());
        let single = Checkpoint::from_dir(shipped(name)).unwrap();
        for ckpt in [
            Checkpoint::from_dir(&dir).unwrap(),
            Checkpoint::open(dir.to_str().unwrap()).unwrap(),
            Checkpoint::from_files(&dir.join(CONFIG_FILE), &dir.join(WEIGHTS_INDEX_FILE)).unwrap(),
        ] {
            assert_eq!(ckpt.config, single.config, "{name}");
            assert_eq!(tensor_values(&ckpt), tensor_values(&single), "{name}");
        }
    }

    // From a Hub cache: the shards beside the index in the snapshot, symlinks into its blobs.
    let cache = tmp.path().join("hub");
    add_files_to_hub_cache(
        &cache,
        "org/sharded",
        COMMIT,
        &tmp.path().join("scale_batchnorm"),
        &[CONFIG_FILE, WEIGHTS_INDEX_FILE, SHARDS[0], SHARDS[1]],
        Some("main"),
    );
    let ckpt = Checkpoint::from_hub_cache(&hf_hub::Cache::new(cache), "org/sharded", None).unwrap();
    let single = Checkpoint::from_dir(shipped("scale_batchnorm")).unwrap();
    assert_eq!(tensor_values(&ckpt), tensor_values(&single));
}

#[test]
fn sharded_checkpoint_errors_are_named() {
    let tmp = TempDir::new("sharded-errors");
    let name = "scale_batchnorm";
    let case = |what: &str| tmp.path().join(what);

    let dir = case("missing-shard");
    write_sharded(name, &dir, |_| {}, |_| {});
    std::fs::remove_file(dir.join(SHARDS[1])).unwrap();
    let shard = dir.join(SHARDS[1]);
    assert_err(
        Checkpoint::from_dir(&dir),
        &["cannot read", shard.to_str().unwrap()],
    );

    let dir = case("truncated-shard");
    write_sharded(name, &dir, |_| {}, |_| {});
    let shard = dir.join(SHARDS[0]);
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 1]).unwrap();
    assert_err(
        Checkpoint::from_dir(&dir),
        &[shard.to_str().unwrap(), "is not a valid safetensors file"],
    );

    // The index and the shards disagree: a tensor assigned to the other shard, or left out.
    let moved = |map: &mut Map<String, Value>| {
        map.insert("bn.bias".into(), Value::from(SHARDS[1]));
    };
    let dropped = |map: &mut Map<String, Value>| {
        map.remove("bn.bias");
    };
    for (what, edit) in [
        ("moved", &moved as &dyn Fn(&mut Map<String, Value>)),
        ("dropped", &dropped),
    ] {
        let dir = case(what);
        write_sharded(name, &dir, |_| {}, |map| edit(map));
        assert_err(
            Checkpoint::from_dir(&dir),
            &[WEIGHTS_INDEX_FILE, "the index assigns", "bn.bias"],
        );
    }

    // A shard named outside the checkpoint's directory is refused, not opened.
    let dir = case("outside");
    write_sharded(
        name,
        &dir,
        |_| {},
        |map| {
            for shard in map.values_mut() {
                *shard = Value::from(format!("../outside/{}", shard.as_str().unwrap()));
            }
        },
    );
    assert_err(
        Checkpoint::from_dir(&dir),
        &[WEIGHTS_INDEX_FILE, "is not a file name"],
    );

    let dir = case("not-an-index");
    write_sharded(name, &dir, |_| {}, |_| {});
    std::fs::write(dir.join(WEIGHTS_INDEX_FILE), r#"{"metadata": {}}"#).unwrap();
    assert_err(
        Checkpoint::from_dir(&dir),
        &[
            WEIGHTS_INDEX_FILE,
            "is not a safetensors index",
            "weight_map",
        ],
    );

    // Consistent shards that together miss a tensor of the state_dict.
    let dir = case("missing-tensor");
    write_sharded(
        name,
        &dir,
        |t| {
            t.remove("bn.running_var");
        },
        |_| {},
    );
    assert_err(
        Checkpoint::from_dir(&dir),
        &[WEIGHTS_INDEX_FILE, "missing tensor \"bn.running_var\""],
    );
}

#[test]
fn missing_tensors_are_named() {
    let tmp = TempDir::new("missing-tensor");
    for name in MODELS {
        let config = Checkpoint::from_dir(shipped(name)).unwrap().config;
        for (tensor, shape, _) in config.expected_tensors() {
            let dir = variant(
                name,
                &tmp.path().join(&tensor),
                |_| {},
                |t| {
                    t.remove(&tensor);
                },
            );
            assert_err(
                Checkpoint::from_dir(&dir),
                &[
                    WEIGHTS_FILE,
                    &format!("missing tensor {tensor:?} (expected shape {shape:?})"),
                    name,
                ],
            );
        }
    }
}

#[test]
fn extra_tensors_are_named() {
    let tmp = TempDir::new("extra-tensor");
    let extra = |name: &str, dir: &str, key: &str| {
        let dir = variant(
            name,
            &tmp.path().join(dir),
            |_| {},
            |t| {
                t.insert(
                    key.to_string(),
                    Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
                );
            },
        );
        assert_err(
            Checkpoint::from_dir(&dir),
            &[WEIGHTS_FILE, &format!("unexpected tensor {key:?}"), name],
        );
    };
    extra("scale_batchnorm", "a", "bn.extra");
    // Another model's tensor name is unexpected too.
    extra("swish_scale", "b", "scale");
    extra("sigmoid_residual", "c", "matmul.weight");
}

#[test]
fn misshapen_tensors_are_named() {
    let tmp = TempDir::new("misshapen");
    let cases: [(&str, &str, Vec<usize>); 4] = [
        ("scale_batchnorm", "gemm.weight", vec![33, 27]),
        ("scale_batchnorm", "bn.running_var", vec![1, 27]),
        ("scale_batchnorm", "bn.num_batches_tracked", vec![1]),
        ("swish_scale", "matmul.bias", vec![28]),
    ];
    for (i, (name, key, shape)) in cases.into_iter().enumerate() {
        let dir = variant(
            name,
            &tmp.path().join(i.to_string()),
            |_| {},
            |t| {
                let dtype = t[key].dtype();
                t.insert(
                    key.to_string(),
                    Tensor::zeros(shape.as_slice(), dtype, &Device::Cpu).unwrap(),
                );
            },
        );
        assert_err(
            Checkpoint::from_dir(&dir),
            &[WEIGHTS_FILE, &format!("tensor {key:?} has shape {shape:?}")],
        );
    }
    // A config whose sizes disagree with the tensors.
    let dir = variant(
        "sigmoid_residual",
        &tmp.path().join("config"),
        |c| {
            c.insert("in_features".into(), 30.into());
        },
        |_| {},
    );
    assert_err(
        Checkpoint::from_dir(&dir),
        &[
            WEIGHTS_FILE,
            "tensor \"gemm.weight\" has shape [23, 31], expected [23, 30]",
            "in_features 30",
        ],
    );
}

#[test]
fn mistyped_tensors_are_named() {
    let tmp = TempDir::new("mistyped");
    let cases = [
        (
            "scale_batchnorm",
            "gemm.bias",
            DType::I64,
            "expected a float dtype",
        ),
        (
            "scale_batchnorm",
            "scale",
            DType::U8,
            "expected a float dtype",
        ),
        (
            "swish_scale",
            "matmul.weight",
            DType::U32,
            "expected a float dtype",
        ),
        (
            "scale_batchnorm",
            "bn.num_batches_tracked",
            DType::F32,
            "expected int64",
        ),
        (
            "scale_batchnorm",
            "bn.num_batches_tracked",
            DType::U32,
            "expected int64",
        ),
    ];
    for (i, (name, key, dtype, want)) in cases.into_iter().enumerate() {
        let dir = variant(
            name,
            &tmp.path().join(i.to_string()),
            |_| {},
            |t| {
                let converted = t[key].to_dtype(dtype).unwrap();
                t.insert(key.to_string(), converted);
            },
        );
        assert_err(
            Checkpoint::from_dir(&dir),
            &[
                WEIGHTS_FILE,
                &format!("tensor {key:?} has dtype {dtype:?}, {want}"),
            ],
        );
    }
    // Other float dtypes are accepted and converted: f64 holds the f32 values exactly.
    let dir = variant(
        "scale_batchnorm",
        &tmp.path().join("f64"),
        |_| {},
        |t| {
            for v in t.values_mut() {
                if v.dtype() == DType::F32 {
                    *v = v.to_dtype(DType::F64).unwrap();
                }
            }
        },
    );
    let ckpt = Checkpoint::from_dir(&dir).unwrap();
    assert_eq!(ckpt.tensors["gemm.weight"].dtype(), DType::F64);
    let from_dir = Checkpoint::from_dir(shipped("scale_batchnorm")).unwrap();
    assert_eq!(
        eval_output(&ckpt, "scale_batchnorm"),
        eval_output(&from_dir, "scale_batchnorm")
    );
}

#[test]
fn truncated_or_corrupt_weights_are_reported() {
    let tmp = TempDir::new("truncated");
    let bytes = std::fs::read(shipped("swish_scale").join(WEIGHTS_FILE)).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert!(
        8 + header_len < bytes.len() / 2,
        "the header should end in the first half"
    );
    let mut huge_header = bytes.clone();
    huge_header[..8].copy_from_slice(&(bytes.len() as u64 * 2).to_le_bytes());
    let mut bad_json = bytes.clone();
    bad_json[8] = b'[';
    let mut trailing_byte = bytes.clone();
    trailing_byte.push(0);
    // The header rewritten, the tensors' bytes kept.
    let edit_header = |edit: &dyn Fn(&mut Map<String, Value>)| {
        let mut header: Map<String, Value> =
            serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        edit(&mut header);
        let header = serde_json::to_vec(&header).unwrap();
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&header);
        file.extend_from_slice(&bytes[8 + header_len..]);
        file
    };
    let first_tensor = |header: &mut Map<String, Value>| -> String {
        header
            .iter()
            .find(|(_, info)| info["data_offsets"][0] == 0)
            .map(|(name, _)| name.clone())
            .unwrap()
    };
    let gap = edit_header(&|header| {
        let name = first_tensor(header);
        let end = header[&name]["data_offsets"][1].as_u64().unwrap();
        header[&name]["data_offsets"] = serde_json::json!([1, end]);
    });
    let shape_too_long = edit_header(&|header| {
        let name = first_tensor(header);
        header[&name]["shape"][0] = Value::from(100_000);
    });
    let cases: [(&str, Vec<u8>); 9] = [
        ("half", bytes[..bytes.len() / 2].to_vec()),
        ("inside-header", bytes[..8 + header_len / 2].to_vec()),
        ("last-byte", bytes[..bytes.len() - 1].to_vec()),
        ("length-prefix", bytes[..4].to_vec()),
        ("huge-header-length", huge_header),
        ("header-not-json", bad_json),
        ("trailing-byte", trailing_byte),
        ("gap-between-tensors", gap),
        ("shape-longer-than-data", shape_too_long),
    ];
    for (what, data) in cases {
        let dir = tmp.path().join(what);
        copy_shipped("swish_scale", &dir);
        std::fs::write(dir.join(WEIGHTS_FILE), data).unwrap();
        let path = dir.join(WEIGHTS_FILE);
        assert_err(
            Checkpoint::from_dir(&dir),
            &[path.to_str().unwrap(), "is not a valid safetensors file"],
        );
    }
}

/// Every single-byte change to the length prefix or the header of a shipped checkpoint, to
/// any of a dozen values that JSON gives meaning to (digits, quotes, brackets, separators) or
/// that are not UTF-8: loading never panics, and either fails naming the file or a tensor or
/// yields the very tensors of the unchanged file.
#[test]
fn single_byte_changes_to_a_header_never_panic() {
    let tmp = TempDir::new("header-bytes");
    let dir = tmp.path().join("scale_batchnorm");
    copy_shipped("scale_batchnorm", &dir);
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let original = tensor_values(&Checkpoint::from_dir(&dir).unwrap());
    let mut errors = 0;
    for at in 0..header_end {
        for value in *b"09-e,\"[]{} \x00\xff\x80" {
            if bytes[at] == value {
                continue;
            }
            let mut changed = bytes.clone();
            changed[at] = value;
            std::fs::write(&path, &changed).unwrap();
            let loaded = std::panic::catch_unwind(|| Checkpoint::from_dir(&dir))
                .unwrap_or_else(|_| panic!("byte {at} set to {value:#04x}: loading panicked"));
            match loaded {
                Ok(ckpt) => assert!(
                    tensor_values(&ckpt) == original,
                    "byte {at} set to {value:#04x}: loaded, with other tensors"
                ),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(path.to_str().unwrap()) || msg.contains("tensor"),
                        "byte {at} set to {value:#04x}: {msg:?} names neither the file nor a tensor"
                    );
                    errors += 1;
                }
            }
        }
    }
    assert!(errors > 0, "no change was refused");
}

#[test]
fn every_float_dtype_is_read_bit_for_bit() {
    let tmp = TempDir::new("float-dtypes");
    for dtype in [DType::F16, DType::BF16, DType::F32, DType::F64] {
        let mut written = HashMap::new();
        let dir = variant(
            "scale_batchnorm",
            &tmp.path().join(format!("{dtype:?}")),
            |_| {},
            |t| {
                for v in t.values_mut() {
                    if v.dtype() != DType::I64 {
                        *v = v.to_dtype(dtype).unwrap();
                    }
                }
                written = t.clone();
            },
        );
        let ckpt = Checkpoint::from_dir(&dir).unwrap();
        assert_eq!(ckpt.tensors.len(), written.len());
        for (name, want) in &written {
            let got = &ckpt.tensors[name];
            assert_eq!(got.dtype(), want.dtype(), "{dtype:?} {name}");
            assert_eq!(got.dims(), want.dims(), "{dtype:?} {name}");
            // Every dtype here widens exactly into f64, so equal values are equal bits.
            assert_eq!(to_f64(got), to_f64(want), "{dtype:?} {name}");
        }
    }
}

#[test]
fn missing_files_are_named() {
    let tmp = TempDir::new("missing-file");
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        let dir = tmp.path().join(file);
        copy_shipped("sigmoid_residual", &dir);
        std::fs::remove_file(dir.join(file)).unwrap();
        let path = dir.join(file);
        assert_err(
            Checkpoint::from_dir(&dir),
            &["cannot read", path.to_str().unwrap()],
        );
        assert_err(
            Checkpoint::open(dir.to_str().unwrap()),
            &["cannot read", path.to_str().unwrap()],
        );
    }
    let absent = tmp.path().join("absent");
    assert_err(
        Checkpoint::from_dir(&absent),
        &[
            "checkpoint directory",
            absent.to_str().unwrap(),
            "does not exist",
        ],
    );
    let file = shipped("swish_scale").join(CONFIG_FILE);
    assert_err(
        Checkpoint::from_dir(&file),
        &[
            "checkpoint directory",
            file.to_str().unwrap(),
            "is not a directory",
        ],
    );
    let config = tmp.path().join("x.json");
    assert_err(
        Checkpoint::from_files(&config, &shipped("swish_scale").join(WEIGHTS_FILE)),
        &["cannot read", config.to_str().unwrap()],
    );
}

#[test]
fn bad_configs_are_named() {
    let tmp = TempDir::new("config");
    type Edit = fn(&mut Map<String, Value>);
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "swish_scale",
            |c| {
                c.insert("model".into(), "mlp".into());
            },
            "unknown model \"mlp\"",
        ),
        (
            "swish_scale",
            |c| {
                c.insert("model".into(), 3.into());
            },
            "\"model\" must be a string",
        ),
        (
            "swish_scale",
            |c| {
                c.remove("model");
            },
            "missing \"model\"",
        ),
        (
            "swish_scale",
            |c| {
                c.remove("in_features");
            },
            "missing \"in_features\"",
        ),
        (
            "scale_batchnorm",
            |c| {
                c.remove("out_features");
            },
            "missing \"out_features\"",
        ),
        (
            "swish_scale",
            |c| {
                c.insert("in_features".into(), 0.into());
            },
            "\"in_features\" must be a positive integer, got 0",
        ),
        (
            "sigmoid_residual",
            |c| {
                c.insert("out_features".into(), (-3).into());
            },
            "\"out_features\" must be a positive integer, got -3",
        ),
        (
            "sigmoid_residual",
            |c| {
                c.insert("out_features".into(), 2.5.into());
            },
            "\"out_features\" must be a positive integer, got 2.5",
        ),
        (
            "scale_batchnorm",
            |c| {
                c.insert("in_features".into(), "33".into());
            },
            "\"in_features\" must be a positive integer, got \"33\"",
        ),
        (
            "swish_scale",
            |c| {
                c.remove("scaling_factor");
            },
            "missing \"scaling_factor\"",
        ),
        (
            "sigmoid_residual",
            |c| {
                c.remove("scaling_factor");
            },
            "missing \"scaling_factor\"",
        ),
        (
            "swish_scale",
            |c| {
                c.insert("scaling_factor".into(), "2".into());
            },
            "\"scaling_factor\" must be a finite number",
        ),
        (
            "swish_scale",
            |c| {
                let f = c.remove("scaling_factor").unwrap();
                c.insert("scalling_factor".into(), f);
            },
            "unexpected key \"scalling_factor\" for model swish_scale",
        ),
        (
            "swish_scale",
            |c| {
                c.insert("eps".into(), 1e-5.into());
            },
            "unexpected key \"eps\" for model swish_scale",
        ),
        (
            "sigmoid_residual",
            |c| {
                c.insert("momentum".into(), 0.1.into());
            },
            "unexpected key \"momentum\" for model sigmoid_residual",
        ),
        (
            "scale_batchnorm",
            |c| {
                c.insert("scaling_factor".into(), 2.0.into());
            },
            "unexpected key \"scaling_factor\" for model scale_batchnorm",
        ),
        (
            "scale_batchnorm",
            |c| {
                c.insert("momentum".into(), 1.5.into());
            },
            "\"momentum\" must be in [0, 1] or null, got 1.5",
        ),
        (
            "scale_batchnorm",
            |c| {
                c.insert("momentum".into(), (-0.1).into());
            },
            "\"momentum\" must be in [0, 1] or null, got -0.1",
        ),
        (
            "scale_batchnorm",
            |c| {
                c.insert("momentum".into(), "0.1".into());
            },
            "\"momentum\" must be a finite number",
        ),
        (
            "scale_batchnorm",
            |c| {
                c.insert("eps".into(), 0.into());
            },
            "\"eps\" must be positive and finite, got 0",
        ),
        (
            "scale_batchnorm",
            |c| {
                c.insert("eps".into(), (-1e-5).into());
            },
            "\"eps\" must be positive and finite, got -0.00001",
        ),
        (
            "scale_batchnorm",
            |c| {
                c.insert("eps".into(), Value::Null);
            },
            "\"eps\" must be a finite number, got null",
        ),
    ];
    for (i, (name, edit, needle)) in cases.into_iter().enumerate() {
        let dir = variant(name, &tmp.path().join(i.to_string()), edit, |_| {});
        let path = dir.join(CONFIG_FILE);
        assert_err(
            Checkpoint::from_dir(&dir),
            &[path.to_str().unwrap(), needle],
        );
    }
    // Not JSON, and JSON that is not an object.
    for (i, (text, needle)) in [
        ("{\"model\": \"swish_scale\",", "not valid JSON"),
        ("", "not valid JSON"),
        ("[\"swish_scale\", 37, 29]", "expected a JSON object"),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tmp.path().join(format!("text{i}"));
        copy_shipped("swish_scale", &dir);
        std::fs::write(dir.join(CONFIG_FILE), text).unwrap();
        let path = dir.join(CONFIG_FILE);
        assert_err(
            Checkpoint::from_dir(&dir),
            &[path.to_str().unwrap(), needle],
        );
    }
}

#[test]
fn batch_norm_config_defaults_and_null_momentum() {
    // Without eps and momentum: PyTorch's defaults.
    let text = r#"{"model": "scale_batchnorm", "in_features": 33, "out_features": 27}"#;
    let config = ModelConfig::from_json(text, "inline").unwrap();
    assert_eq!((config.eps, config.momentum), (1e-5, Some(0.1)));
    // momentum null: the cumulative moving average; the JSON round trip keeps it null.
    let text =
        r#"{"model": "scale_batchnorm", "in_features": 33, "out_features": 27, "momentum": null}"#;
    let config = ModelConfig::from_json(text, "inline").unwrap();
    assert_eq!(config.momentum, None);
    assert_eq!(
        ModelConfig::from_json(&config.to_json(), "round trip").unwrap(),
        config
    );
    assert!(config.to_json().contains("\"momentum\": null"));
}

/// `(x·Wᵀ + b) * scale` in f64 from the current values of a VarMap's variables: the input of
/// ScaleBatchNorm's BatchNorm.
fn batch_norm_input(map: &VarMap, x: &Tensor) -> Tensor {
    let var = |name: &str| {
        map.data().lock().unwrap()[name]
            .as_tensor()
            .to_dtype(DType::F64)
            .unwrap()
    };
    x.to_dtype(DType::F64)
        .unwrap()
        .matmul(&var("gemm.weight").t().unwrap())
        .unwrap()
        .broadcast_add(&var("gemm.bias"))
        .unwrap()
        .broadcast_mul(&var("scale"))
        .unwrap()
}

/// PyTorch's running-statistics update in f64: `(1 - f) * old + f * batch`, with the batch's
/// mean and unbiased variance.
fn expected_running_stats(
    u: &Tensor,
    old_mean: &[f64],
    old_var: &[f64],
    factor: f64,
) -> (Vec<f64>, Vec<f64>) {
    let n = u.dim(0).unwrap() as f64;
    let mean = u.mean(0).unwrap();
    let centred = u.broadcast_sub(&mean).unwrap();
    let unbiased = (centred.sqr().unwrap().sum(0).unwrap() / (n - 1.0)).unwrap();
    let blend = |old: &[f64], batch: Vec<f64>| {
        old.iter()
            .zip(batch)
            .map(|(o, b)| (1.0 - factor) * o + factor * b)
            .collect()
    };
    (
        blend(old_mean, to_f64(&mean)),
        blend(old_var, to_f64(&unbiased)),
    )
}

fn var_values(map: &VarMap, name: &str) -> Vec<f64> {
    to_f64(map.data().lock().unwrap()[name].as_tensor())
}

fn batches_tracked(map: &VarMap) -> i64 {
    map.data().lock().unwrap()["bn.num_batches_tracked"]
        .as_tensor()
        .to_scalar::<i64>()
        .unwrap()
}

/// The shipped ScaleBatchNorm with `momentum: null` (PyTorch's cumulative average), built in f64
/// from a `VarMap` that holds its variables.
fn cumulative_average_model(tag: &str) -> (VarMap, Model) {
    let tmp = TempDir::new(tag);
    let dir = variant(
        "scale_batchnorm",
        tmp.path(),
        |c| {
            c.insert("momentum".into(), Value::Null);
        },
        |_| {},
    );
    let ckpt = Checkpoint::from_dir(&dir).unwrap();
    assert_eq!(ckpt.config.momentum, None);
    let map = ckpt.var_map(DType::F64, &Device::Cpu).unwrap();
    let model = Model::load(
        VarBuilder::from_varmap(&map, DType::F64, &Device::Cpu),
        &ckpt.config,
    )
    .unwrap();
    (map, model)
}

#[test]
fn null_momentum_is_a_cumulative_average() {
    let (map, model) = cumulative_average_model("cumulative");
    let x = input("scale_batchnorm").to_dtype(DType::F64).unwrap();
    let start = batches_tracked(&map);
    for (i, rows) in [19, 5].into_iter().enumerate() {
        let x = x.narrow(0, 0, rows).unwrap();
        let u = batch_norm_input(&map, &x);
        // PyTorch: num_batches_tracked += 1, then factor = 1 / num_batches_tracked.
        let factor = 1.0 / (start + i as i64 + 1) as f64;
        let (mean, var) = expected_running_stats(
            &u,
            &var_values(&map, "bn.running_mean"),
            &var_values(&map, "bn.running_var"),
            factor,
        );
        model.forward_t(&x, true).unwrap();
        assert!(rel_err(&var_values(&map, "bn.running_mean"), &mean) < 1e-12);
        assert!(rel_err(&var_values(&map, "bn.running_var"), &var) < 1e-12);
        assert_eq!(batches_tracked(&map), start + i as i64 + 1);
    }
}

/// A negative `bn.num_batches_tracked` is refused when the model is built; the largest int64
/// runs in eval mode, and a train step, which would overflow it, is refused by name.
#[test]
fn batch_counts_that_cannot_be_counted_on_are_refused() {
    let tmp = TempDir::new("batch-count");
    let x = input("scale_batchnorm");
    for (count, loads, trains) in [
        (-1i64, false, false),
        (i64::MAX, true, false),
        (i64::MAX - 1, true, true),
    ] {
        let dir = variant(
            "scale_batchnorm",
            &tmp.path().join(count.to_string()),
            |c| {
                c.insert("momentum".into(), Value::Null);
            },
            |t| {
                t.insert(
                    "bn.num_batches_tracked".into(),
                    Tensor::new(count, &Device::Cpu).unwrap(),
                );
            },
        );
        let model = Checkpoint::from_dir(&dir)
            .unwrap()
            .load_model(DType::F32, &Device::Cpu);
        if !loads {
            assert_err(model, &["bn.num_batches_tracked is -1", "negative"]);
            continue;
        }
        let model = model.unwrap();
        model.forward_t(&x, false).unwrap();
        let step = model.forward_t(&x, true);
        if trains {
            step.unwrap();
        } else {
            assert_err(
                step,
                &["bn.num_batches_tracked is 9223372036854775807", "overflow"],
            );
        }
    }
}

/// A count of batches restored into `bn.num_batches_tracked` after the model was built (a resumed
/// run: `VarMap::load` or `set_one`) is the one the cumulative average divides by, as in PyTorch,
/// and the one the overflow and sign checks see.
#[test]
fn a_batch_count_restored_after_loading_is_the_one_used() {
    let (mut map, model) = cumulative_average_model("restored-count");
    let x = input("scale_batchnorm").to_dtype(DType::F64).unwrap();
    let count = |value: i64| Tensor::new(value, &Device::Cpu).unwrap();

    map.set_one("bn.num_batches_tracked", count(99)).unwrap();
    let (mean, var) = expected_running_stats(
        &batch_norm_input(&map, &x),
        &var_values(&map, "bn.running_mean"),
        &var_values(&map, "bn.running_var"),
        1.0 / 100.0,
    );
    model.forward_t(&x, true).unwrap();
    assert!(rel_err(&var_values(&map, "bn.running_mean"), &mean) < 1e-12);
    assert!(rel_err(&var_values(&map, "bn.running_var"), &var) < 1e-12);
    assert_eq!(batches_tracked(&map), 100);

    for (value, needles) in [
        (i64::MAX, ["is 9223372036854775807", "overflow"]),
        (-3, ["is -3", "negative"]),
    ] {
        map.set_one("bn.num_batches_tracked", count(value)).unwrap();
        assert_err(model.forward_t(&x, true), &needles);
        assert_eq!(
            batches_tracked(&map),
            value,
            "a refused step keeps the count"
        );
    }
}

/// A config that `config.json` cannot carry (a NaN or an infinity would be written as `null`,
/// so a NaN momentum would read back as the cumulative average) or that `from_dir` would refuse
/// is refused by `save`, by key, before anything is written.
#[test]
fn save_refuses_a_config_that_would_not_read_back() {
    let tmp = TempDir::new("save-config");
    for name in MODELS {
        let ckpt = Checkpoint::from_dir(shipped(name)).unwrap();
        let tensors: Vec<(String, Tensor)> = ckpt.tensors.clone().into_iter().collect();
        let mut bad: Vec<(ModelConfig, &str)> = vec![(
            ModelConfig {
                in_features: 0,
                ..ckpt.config.clone()
            },
            "\"in_features\" must be a positive integer",
        )];
        if name == "scale_batchnorm" {
            for m in [f64::NAN, f64::INFINITY, 5.0, -0.5] {
                let config = ModelConfig {
                    momentum: Some(m),
                    ..ckpt.config.clone()
                };
                bad.push((config, "\"momentum\" must be in [0, 1] or null"));
            }
            for eps in [f64::NAN, f64::INFINITY, 0.0, -1.0] {
                let config = ModelConfig {
                    eps,
                    ..ckpt.config.clone()
                };
                bad.push((config, "\"eps\" must be positive and finite"));
            }
        } else {
            for f in [f64::NAN, f64::NEG_INFINITY] {
                let config = ModelConfig {
                    scaling_factor: Some(f),
                    ..ckpt.config.clone()
                };
                bad.push((config, "\"scaling_factor\" must be a finite number"));
            }
            let config = ModelConfig {
                scaling_factor: None,
                ..ckpt.config.clone()
            };
            bad.push((config, "missing \"scaling_factor\""));
        }
        if name == "scale_batchnorm" {
            let config = ModelConfig {
                scaling_factor: Some(2.0),
                ..ckpt.config.clone()
            };
            bad.push((config, "scale_batchnorm takes no \"scaling_factor\""));
        }
        for (in_features, out_features) in [(1 << 62, 4), (1 << 33, 1 << 33)] {
            let config = ModelConfig {
                in_features,
                out_features,
                ..ckpt.config.clone()
            };
            bad.push((config, "too large to address"));
        }
        for (i, (config, needle)) in bad.into_iter().enumerate() {
            let dir = tmp.path().join(format!("{name}-{i}"));
            let shown = format!("{config:?}");
            assert_err(
                Checkpoint::save(&dir, &config, &tensors),
                &["cannot save to", needle],
            );
            assert!(!dir.exists(), "{shown}: nothing may be written");
        }
    }
}

#[test]
fn save_round_trips_and_refuses_wrong_tensor_sets() {
    let tmp = TempDir::new("save");
    for name in MODELS {
        let ckpt = Checkpoint::from_dir(shipped(name)).unwrap();
        let model = ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
        // A train-mode forward first, so that BatchNorm's saved buffers differ from the file's.
        let x = input(name);
        model.forward_t(&x, true).unwrap();
        let mut tensors = model.parameters();
        tensors.extend(model.buffers());
        let dir = tmp.path().join(name);
        Checkpoint::save(&dir, &ckpt.config, &tensors).unwrap();

        let reloaded = Checkpoint::from_dir(&dir).unwrap();
        assert_eq!(reloaded.config, ckpt.config, "{name}");
        assert_eq!(reloaded.tensors.len(), tensors.len(), "{name}");
        for (key, t) in &tensors {
            assert_eq!(to_f64(&reloaded.tensors[key]), to_f64(t), "{name}: {key}");
            assert_eq!(reloaded.tensors[key].dtype(), t.dtype(), "{name}: {key}");
        }
        let again = reloaded.load_model(DType::F32, &Device::Cpu).unwrap();
        for train in [false, true] {
            let a: Vec<Vec<f32>> = model.forward_t(&x, train).unwrap().to_vec2().unwrap();
            let b: Vec<Vec<f32>> = again.forward_t(&x, train).unwrap().to_vec2().unwrap();
            assert_eq!(a, b, "{name} (train {train})");
        }
        if name == "scale_batchnorm" {
            assert_eq!(
                to_f64(&reloaded.tensors["bn.num_batches_tracked"]),
                to_f64(
                    &ckpt.tensors["bn.num_batches_tracked"]
                        .affine(1.0, 1.0)
                        .unwrap()
                ),
            );
        }
    }

    // Wrong sets are refused before anything is written.
    let ckpt = Checkpoint::from_dir(shipped("scale_batchnorm")).unwrap();
    let model = ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
    let good: Vec<(String, Tensor)> = model
        .parameters()
        .into_iter()
        .chain(model.buffers())
        .collect();
    let without = |key: &str| -> Vec<(String, Tensor)> {
        good.iter().filter(|(n, _)| n != key).cloned().collect()
    };
    let zeros = |shape: &[usize], dtype| Tensor::zeros(shape, dtype, &Device::Cpu).unwrap();
    let cases: Vec<(Vec<(String, Tensor)>, String)> = vec![
        (
            model.parameters(),
            "missing tensor \"bn.running_mean\"".into(),
        ),
        (
            without("bn.num_batches_tracked"),
            "missing tensor \"bn.num_batches_tracked\"".into(),
        ),
        (
            good.iter()
                .cloned()
                .chain([("extra".to_string(), zeros(&[27], DType::F32))])
                .collect(),
            "unexpected tensor \"extra\"".into(),
        ),
        (
            without("scale")
                .into_iter()
                .chain([("scale".to_string(), zeros(&[26], DType::F32))])
                .collect(),
            "tensor \"scale\" has shape [26], expected [27]".into(),
        ),
        (
            without("bn.num_batches_tracked")
                .into_iter()
                .chain([("bn.num_batches_tracked".to_string(), zeros(&[], DType::F32))])
                .collect(),
            "tensor \"bn.num_batches_tracked\" has dtype F32, expected int64".into(),
        ),
        // The dtypes are checked as given, before the floats are converted to f32.
        (
            without("bn.num_batches_tracked")
                .into_iter()
                .chain([("bn.num_batches_tracked".to_string(), zeros(&[], DType::U32))])
                .collect(),
            "tensor \"bn.num_batches_tracked\" has dtype U32, expected int64".into(),
        ),
        (
            without("gemm.weight")
                .into_iter()
                .chain([("gemm.weight".to_string(), zeros(&[27, 33], DType::U8))])
                .collect(),
            "tensor \"gemm.weight\" has dtype U8".into(),
        ),
        // A name given twice would keep only one of its tensors.
        (
            good.iter()
                .cloned()
                .chain([("scale".to_string(), zeros(&[27], DType::F32))])
                .collect(),
            "the tensor \"scale\" is given twice".into(),
        ),
        (
            Checkpoint::from_dir(shipped("swish_scale"))
                .unwrap()
                .load_model(DType::F32, &Device::Cpu)
                .unwrap()
                .parameters(),
            "missing tensor \"gemm.weight\"".into(),
        ),
    ];
    for (i, (tensors, needle)) in cases.into_iter().enumerate() {
        let dir = tmp.path().join(format!("refused{i}"));
        assert_err(Checkpoint::save(&dir, &ckpt.config, &tensors), &[&needle]);
        assert!(!dir.exists(), "a refused save created {}", dir.display());
    }
}

/// A save that fails while writing leaves the directory's previous checkpoint whole, and says
/// which file it could not write.
#[test]
fn a_failed_save_keeps_the_previous_checkpoint() {
    let tmp = TempDir::new("save-fails");
    let dir = tmp.path().join("ckpt");
    let first = Checkpoint::from_dir(shipped("sigmoid_residual")).unwrap();
    let tensors =
        |ckpt: &Checkpoint| -> Vec<(String, Tensor)> { ckpt.tensors.clone().into_iter().collect() };
    Checkpoint::save(&dir, &first.config, &tensors(&first)).unwrap();
    // Another model's save, whose weights cannot be written: a directory stands where the
    // partial weights file would go.
    let second = Checkpoint::from_dir(shipped("swish_scale")).unwrap();
    std::fs::create_dir(dir.join(format!("{WEIGHTS_FILE}.partial"))).unwrap();
    let weights = dir.join(WEIGHTS_FILE);
    assert_err(
        Checkpoint::save(&dir, &second.config, &tensors(&second)),
        &["cannot write", weights.to_str().unwrap()],
    );
    let reloaded = Checkpoint::from_dir(&dir).unwrap();
    assert_eq!(reloaded.config, first.config);
    for (key, t) in &first.tensors {
        assert_eq!(to_f64(&reloaded.tensors[key]), to_f64(t), "{key}");
    }
    // With the obstacle gone, the same save replaces the checkpoint and leaves nothing else.
    std::fs::remove_dir(dir.join(format!("{WEIGHTS_FILE}.partial"))).unwrap();
    Checkpoint::save(&dir, &second.config, &tensors(&second)).unwrap();
    assert_eq!(Checkpoint::from_dir(&dir).unwrap().config, second.config);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [CONFIG_FILE, WEIGHTS_FILE]);
}

/// A fixed regression target for a model's output.
fn target(dims: (usize, usize), seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..dims.0 * dims.1)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

fn snapshot(map: &VarMap) -> HashMap<String, Vec<f64>> {
    map.data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), to_f64(v.as_tensor())))
        .collect()
}

#[test]
fn training_through_a_var_map_lowers_the_loss() {
    for name in MODELS {
        let ckpt = Checkpoint::from_dir(shipped(name)).unwrap();
        let map = ckpt.var_map(DType::F32, &Device::Cpu).unwrap();
        let model = Model::load(
            VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
            &ckpt.config,
        )
        .unwrap();
        let x = input(name);
        let t = target((x.dim(0).unwrap(), ckpt.config.out_features), 7);
        let before = snapshot(&map);
        // Train mode throughout (it only matters to BatchNorm, which then normalises by the
        // batch statistics, the ones the gradients go through).
        let loss = || candle_nn::loss::mse(&model.forward_t(&x, true).unwrap(), &t).unwrap();
        let trainable = model.trainable_vars().unwrap();
        // Exactly the parameters: the BatchNorm buffers stay out of the optimizer.
        assert_eq!(trainable.len(), model.parameters().len());
        assert_eq!(
            trainable.len() + model.buffers().len(),
            map.all_vars().len()
        );
        let mut sgd = SGD::new(trainable, 0.05).unwrap();
        let initial = loss().to_scalar::<f32>().unwrap();
        for _ in 0..10 {
            sgd.backward_step(&loss()).unwrap();
        }
        let last = loss().to_scalar::<f32>().unwrap();
        assert!(
            last < initial,
            "{name}: the loss went from {initial} to {last}"
        );
        let after = snapshot(&map);
        for (key, _) in model.parameters() {
            // Train-mode BatchNorm cancels the gradients of a per-feature shift and (but for
            // eps) scale of its input: the linear bias and the learned scale barely move.
            if name == "scale_batchnorm" && (key == "gemm.bias" || key == "scale") {
                continue;
            }
            assert_ne!(before[&key], after[&key], "{name}: {key} did not change");
        }
        // The model reads the map's variables: the trained map saves and reloads as it is.
        let tmp = TempDir::new("trained");
        let mut tensors = model.parameters();
        tensors.extend(model.buffers());
        Checkpoint::save(tmp.path(), &ckpt.config, &tensors).unwrap();
        let reloaded = Checkpoint::from_dir(tmp.path()).unwrap();
        for (key, values) in &after {
            assert_eq!(&to_f64(&reloaded.tensors[key]), values, "{name}: {key}");
        }
    }
}

#[test]
fn batch_norm_running_stats_in_a_var_map_follow_pytorch() {
    let ckpt = Checkpoint::from_dir(shipped("scale_batchnorm")).unwrap();
    assert_eq!(ckpt.config.momentum, Some(0.1));
    let x = input("scale_batchnorm");
    let t = target((x.dim(0).unwrap(), ckpt.config.out_features), 11);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        let map = ckpt.var_map(dtype, &Device::Cpu).unwrap();
        let model = Model::load(
            VarBuilder::from_varmap(&map, dtype, &Device::Cpu),
            &ckpt.config,
        )
        .unwrap();
        let x = x.to_dtype(dtype).unwrap();
        let t = t.to_dtype(dtype).unwrap();
        let mut sgd = SGD::new(map.all_vars(), 0.05).unwrap();
        let start = batches_tracked(&map);
        // Train-mode forwards on batches of several sizes (2 rows: the largest n/(n-1)), each
        // followed by an optimizer step so the next batch sees other weights.
        for (i, rows) in [19, 2, 11].into_iter().enumerate() {
            let xb = x.narrow(0, 0, rows).unwrap();
            let (mean, var) = expected_running_stats(
                &batch_norm_input(&map, &xb),
                &var_values(&map, "bn.running_mean"),
                &var_values(&map, "bn.running_var"),
                ckpt.config.momentum.unwrap(),
            );
            let old_mean = var_values(&map, "bn.running_mean");
            let y = model.forward_t(&xb, true).unwrap();
            let new_mean = var_values(&map, "bn.running_mean");
            let new_var = var_values(&map, "bn.running_var");
            assert_ne!(
                new_mean, old_mean,
                "{dtype:?}: the running mean did not change"
            );
            let (em, ev) = (rel_err(&new_mean, &mean), rel_err(&new_var, &var));
            assert!(
                em < tol && ev < tol,
                "{dtype:?} batch {rows}: errors {em:e}, {ev:e}"
            );
            assert_eq!(batches_tracked(&map), start + i as i64 + 1, "{dtype:?}");
            // The optimizer step changes the weights but not the buffers.
            let weight = var_values(&map, "gemm.weight");
            let loss = candle_nn::loss::mse(&y, &t.narrow(0, 0, rows).unwrap()).unwrap();
            sgd.backward_step(&loss).unwrap();
            assert_ne!(var_values(&map, "gemm.weight"), weight);
            assert_eq!(var_values(&map, "bn.running_mean"), new_mean);
            assert_eq!(var_values(&map, "bn.running_var"), new_var);
        }
        // Eval-mode forwards (and a train-mode one that fails) leave the buffers alone.
        let buffers = |map: &VarMap| {
            [
                "bn.running_mean",
                "bn.running_var",
                "bn.num_batches_tracked",
            ]
            .map(|n| var_values(map, n))
        };
        let before = buffers(&map);
        for _ in 0..3 {
            model.forward_t(&x, false).unwrap();
        }
        assert_err(
            model.forward_t(&x.narrow(0, 0, 1).unwrap(), true),
            &["got a batch of 1"],
        );
        assert_eq!(buffers(&map), before, "{dtype:?}");
        assert_eq!(batches_tracked(&map), start + 3);
    }
}

#[test]
fn trainable_vars_need_a_var_map() {
    let ckpt = Checkpoint::from_dir(shipped("swish_scale")).unwrap();
    let model = ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
    assert_err(model.trainable_vars(), &["matmul.weight", "VarMap"]);
}
