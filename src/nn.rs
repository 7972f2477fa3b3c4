//! candle-nn-style modules over the fused ops, built from a [`VarBuilder`] with PyTorch's
//! parameter names.
//!
//! Each module reads its parameters under the names of its PyTorch original
//! (`../scripts/export.py` defines them): `matmul.weight`, `gemm.bias`, `scale`, `bn.weight`,
//! `bn.running_mean`, … Built from a [`VarMap`](candle_nn::VarMap)-backed builder, they train
//! with candle-nn's optimizers; the BatchNorm running statistics are variables of that map too,
//! updated in place by train-mode forwards, so saving the map saves them.

use crate::checkpoint::{ModelConfig, ModelKind};
use crate::epilogue::Epilogue;
use crate::ops::{
    fused_linear, fused_linear_batch_norm, fused_linear_batch_norm_traced, fused_linear_traced,
    BatchNormParams, Precision, RunningUpdate, Trace,
};
use candle_core::{bail, DType, Module, ModuleT, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

/// A module whose forward can run outside Candle's autograd graph, returning a [`Trace`] whose
/// backward gives the gradients of the input and of every parameter directly (see [`Trace`] for
/// why that is faster than `Tensor::backward` and how an optimizer takes them).
pub trait TracedModuleT {
    /// The forward of [`ModuleT::forward_t`] (same output, same running-statistics update in
    /// train mode) and the trace of it.
    fn forward_traced(&self, xs: &Tensor, train: bool) -> Result<(Tensor, Trace)>;
}

/// A linear layer with a fused epilogue: `y = epilogue(x·Wᵀ + b)`, for an input `(..., in)`
/// (any leading dimensions, as PyTorch's `nn.Linear`) and an output `(..., out)`.
#[derive(Clone, Debug)]
pub struct FusedLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    scale: Option<Tensor>,
    epilogue: Epilogue,
    precision: Precision,
}

impl FusedLinear {
    /// A layer over existing tensors: `weight` `(out, in)`, `bias` and `scale` `(out,)`.
    /// `scale` is required exactly when the epilogue's scale is per feature.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        scale: Option<Tensor>,
        epilogue: Epilogue,
    ) -> Result<Self> {
        check_scale_given(&epilogue, scale.is_some())?;
        Ok(Self {
            weight,
            bias,
            scale,
            epilogue,
            precision: Precision::default(),
        })
    }

    /// Loads `weight` and `bias` (PyTorch's `nn.Linear` names) from `vb`, initialised like
    /// PyTorch's `nn.Linear` when `vb` creates variables. An epilogue with a per-feature scale
    /// is refused here, as there is no scale to give it (its name depends on the model): read
    /// the three tensors and build such a layer with [`FusedLinear::new`].
    pub fn load(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        epilogue: Epilogue,
    ) -> Result<Self> {
        Self::load_with_scale(vb, in_features, out_features, epilogue, None)
    }

    fn load_with_scale(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        epilogue: Epilogue,
        scale: Option<Tensor>,
    ) -> Result<Self> {
        // Refused before any variable is made, so that a VarMap is left as it was.
        check_scale_given(&epilogue, scale.is_some())?;
        // nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in)) for both tensors.
        let bound = 1.0 / (in_features as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((out_features, in_features), "weight", init)?;
        let bias = vb.get_with_hints(out_features, "bias", init)?;
        Self::new(weight, Some(bias), scale, epilogue)
    }

    /// The same layer with its f32 GPU products computed in `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// The weight, `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `(out,)`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The learned per-feature scale, `(out,)`, if the epilogue has one.
    pub fn scale(&self) -> Option<&Tensor> {
        self.scale.as_ref()
    }

    /// The epilogue.
    pub fn epilogue(&self) -> Epilogue {
        self.epilogue
    }
}

impl Module for FusedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        fused_linear(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.scale.as_ref(),
            self.epilogue,
            self.precision,
        )
    }
}

impl TracedModuleT for FusedLinear {
    fn forward_traced(&self, x: &Tensor, _train: bool) -> Result<(Tensor, Trace)> {
        fused_linear_traced(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.scale.as_ref(),
            self.epilogue,
            self.precision,
        )
    }
}

/// PyTorch's `SwishScale`: `y = z * sigmoid(z) * scaling_factor` with `z = matmul(x)`, for an
/// input `(..., in)` as in PyTorch.
#[derive(Clone, Debug)]
pub struct SwishScale {
    matmul: FusedLinear,
}

impl SwishScale {
    /// Loads `matmul.weight` and `matmul.bias`.
    pub fn load(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        scaling_factor: f64,
    ) -> Result<Self> {
        let epilogue = Epilogue::swish_scale(scaling_factor);
        let matmul = FusedLinear::load(vb.pp("matmul"), in_features, out_features, epilogue)?;
        Ok(Self { matmul })
    }

    /// The same module with its f32 GPU products computed in `precision`.
    pub fn with_precision(self, precision: Precision) -> Self {
        Self {
            matmul: self.matmul.with_precision(precision),
        }
    }

    /// The trainable parameters under their PyTorch names.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        linear_parameters("matmul", &self.matmul)
    }
}

impl Module for SwishScale {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.matmul.forward(x)
    }
}

impl TracedModuleT for SwishScale {
    fn forward_traced(&self, x: &Tensor, train: bool) -> Result<(Tensor, Trace)> {
        self.matmul.forward_traced(x, train)
    }
}

/// PyTorch's `SigmoidResidual`: `y = sigmoid(z) * scaling_factor + z` with `z = gemm(x)`, for
/// an input `(..., in)` as in PyTorch.
#[derive(Clone, Debug)]
pub struct SigmoidResidual {
    gemm: FusedLinear,
}

impl SigmoidResidual {
    /// Loads `gemm.weight` and `gemm.bias`.
    pub fn load(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        scaling_factor: f64,
    ) -> Result<Self> {
        let epilogue = Epilogue::sigmoid_residual(scaling_factor);
        let gemm = FusedLinear::load(vb.pp("gemm"), in_features, out_features, epilogue)?;
        Ok(Self { gemm })
    }

    /// The same module with its f32 GPU products computed in `precision`.
    pub fn with_precision(self, precision: Precision) -> Self {
        Self {
            gemm: self.gemm.with_precision(precision),
        }
    }

    /// The trainable parameters under their PyTorch names.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        linear_parameters("gemm", &self.gemm)
    }
}

impl Module for SigmoidResidual {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.gemm.forward(x)
    }
}

impl TracedModuleT for SigmoidResidual {
    fn forward_traced(&self, x: &Tensor, train: bool) -> Result<(Tensor, Trace)> {
        self.gemm.forward_traced(x, train)
    }
}

/// PyTorch's `ScaleBatchNorm`: `y = bn(gemm(x) * scale)`, with `bn` a `BatchNorm1d`, for an
/// input `(batch, in)` (the one shape for which PyTorch's module normalises per feature).
///
/// In train mode ([`ModuleT::forward_t`] with `train = true`) it normalises by the batch
/// statistics and updates `bn.running_mean` (with momentum), `bn.running_var` (with the
/// *unbiased* batch variance) and `bn.num_batches_tracked`, exactly as PyTorch; in eval mode it
/// normalises by the running statistics. With `momentum: None` (the cumulative average) each
/// train step reads `bn.num_batches_tracked` as it is then, as PyTorch does, which on a GPU waits
/// for the device.
#[derive(Debug)]
pub struct ScaleBatchNorm {
    gemm: FusedLinear,
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Var,
    running_var: Var,
    num_batches_tracked: Var,
    eps: f64,
    momentum: Option<f64>,
}

impl ScaleBatchNorm {
    /// Loads `gemm.weight`, `gemm.bias`, `scale`, `bn.weight`, `bn.bias`, `bn.running_mean`,
    /// `bn.running_var` and `bn.num_batches_tracked`. `momentum: None` is PyTorch's cumulative
    /// moving average.
    pub fn load(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        eps: f64,
        momentum: Option<f64>,
    ) -> Result<Self> {
        crate::ops::check_eps(eps)
            .map_err(|e| candle_core::Error::Msg(format!("ScaleBatchNorm: {e}")))?;
        if let Some(m) = momentum {
            if !(0.0..=1.0).contains(&m) {
                bail!("ScaleBatchNorm: momentum must be in [0, 1], got {m}");
            }
        }
        let scale = vb.get_with_hints(
            out_features,
            "scale",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        let gemm = FusedLinear::load_with_scale(
            vb.pp("gemm"),
            in_features,
            out_features,
            Epilogue::per_feature_scale(),
            Some(scale),
        )?;
        let bn = vb.pp("bn");
        let bn_weight = bn.get_with_hints(out_features, "weight", Init::Const(1.0))?;
        let bn_bias = bn.get_with_hints(out_features, "bias", Init::Const(0.0))?;
        let running_mean = Var::from_tensor(&bn.get_with_hints(
            out_features,
            "running_mean",
            Init::Const(0.0),
        )?)?;
        let running_var =
            Var::from_tensor(&bn.get_with_hints(out_features, "running_var", Init::Const(1.0))?)?;
        let num_batches_tracked = Var::from_tensor(&bn.get_with_hints_dtype(
            (),
            "num_batches_tracked",
            Init::Const(0.0),
            DType::I64,
        )?)?;
        batches_seen(&num_batches_tracked)?;
        Ok(Self {
            gemm,
            bn_weight,
            bn_bias,
            running_mean,
            running_var,
            num_batches_tracked,
            eps,
            momentum,
        })
    }

    /// The same module with its f32 GPU products computed in `precision`.
    pub fn with_precision(self, precision: Precision) -> Self {
        Self {
            gemm: self.gemm.with_precision(precision),
            ..self
        }
    }

    /// The trainable parameters under their PyTorch names.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut params = linear_parameters("gemm", &self.gemm);
        params.extend([
            (
                "scale".to_string(),
                self.gemm.scale().expect("per-feature scale").clone(),
            ),
            ("bn.weight".to_string(), self.bn_weight.clone()),
            ("bn.bias".to_string(), self.bn_bias.clone()),
        ]);
        params
    }

    /// `bn.running_mean`, `bn.running_var` and `bn.num_batches_tracked`, as they are now.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        vec![
            (
                "bn.running_mean".to_string(),
                self.running_mean.as_tensor().clone(),
            ),
            (
                "bn.running_var".to_string(),
                self.running_var.as_tensor().clone(),
            ),
            (
                "bn.num_batches_tracked".to_string(),
                self.num_batches_tracked.as_tensor().clone(),
            ),
        ]
    }

    /// Runs the fused forward `op` on `x` with this module's operands and BatchNorm's parameters
    /// and buffers: in train mode with PyTorch's running-statistics update (momentum or
    /// cumulative average, and `num_batches_tracked` counted), which the op applies in place.
    ///
    /// The cumulative average (momentum `None`) reads `num_batches_tracked` at each train step,
    /// as PyTorch does, so that a count restored into the buffer after loading (through a
    /// `VarMap`, say) is the one used; on a GPU that read waits for the device. With a momentum
    /// the count is only incremented.
    fn apply<R>(&self, x: &Tensor, train: bool, op: BatchNormForward<R>) -> Result<R> {
        let factor = match (train, self.momentum) {
            (false, _) => None,
            (true, Some(momentum)) => Some(momentum),
            (true, None) => {
                let seen = batches_seen(&self.num_batches_tracked)?;
                if seen == i64::MAX {
                    bail!(
                        "ScaleBatchNorm: bn.num_batches_tracked is {seen}, which one more batch \
                         would overflow"
                    );
                }
                Some(1.0 / (seen as f64 + 1.0))
            }
        };
        let update = factor.map(|factor| RunningUpdate {
            factor,
            num_batches_tracked: Some(self.num_batches_tracked.as_tensor()),
        });
        let bn = BatchNormParams {
            weight: &self.bn_weight,
            bias: &self.bn_bias,
            running_mean: self.running_mean.as_tensor(),
            running_var: self.running_var.as_tensor(),
            eps: self.eps,
            update,
        };
        op(
            x,
            self.gemm.weight(),
            self.gemm.bias(),
            self.gemm.scale(),
            self.gemm.epilogue(),
            &bn,
            train,
            self.gemm.precision,
        )
    }
}

/// `bn.num_batches_tracked` as it is now, refused when negative (no count of batches is).
fn batches_seen(num_batches_tracked: &Var) -> Result<i64> {
    let seen = num_batches_tracked.to_scalar::<i64>()?;
    if seen < 0 {
        bail!("ScaleBatchNorm: bn.num_batches_tracked is {seen}, a negative count of batches");
    }
    Ok(seen)
}

impl ModuleT for ScaleBatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (y, _) = self.apply(x, train, fused_linear_batch_norm)?;
        Ok(y)
    }
}

impl TracedModuleT for ScaleBatchNorm {
    fn forward_traced(&self, x: &Tensor, train: bool) -> Result<(Tensor, Trace)> {
        let (y, _, trace) = self.apply(x, train, fused_linear_batch_norm_traced)?;
        Ok((y, trace))
    }
}

/// [`fused_linear_batch_norm`] or its traced form, as [`ScaleBatchNorm::apply`] calls them.
type BatchNormForward<R> = fn(
    &Tensor,
    &Tensor,
    Option<&Tensor>,
    Option<&Tensor>,
    Epilogue,
    &BatchNormParams,
    bool,
    Precision,
) -> Result<R>;

fn linear_parameters(prefix: &str, linear: &FusedLinear) -> Vec<(String, Tensor)> {
    let mut params = vec![(format!("{prefix}.weight"), linear.weight().clone())];
    if let Some(b) = linear.bias() {
        params.push((format!("{prefix}.bias"), b.clone()));
    }
    params
}

/// Any of the seed models, as described by a checkpoint's config.
#[derive(Debug)]
pub enum Model {
    /// See [`SwishScale`].
    SwishScale(SwishScale),
    /// See [`ScaleBatchNorm`].
    ScaleBatchNorm(ScaleBatchNorm),
    /// See [`SigmoidResidual`].
    SigmoidResidual(SigmoidResidual),
}

/// A layer's scale tensor must be given exactly when its epilogue's scale is per feature.
fn check_scale_given(epilogue: &Epilogue, given: bool) -> Result<()> {
    if epilogue.has_scale_param() != given {
        bail!(
            "FusedLinear: a scale tensor must be given exactly when the epilogue's scale is per feature"
        );
    }
    Ok(())
}

impl Model {
    /// Builds the model that `config` describes from `vb` (PyTorch's key names), once the config
    /// passes [`ModelConfig::validate`] (a config built in code skips the JSON reader's checks).
    pub fn load(vb: VarBuilder, config: &ModelConfig) -> Result<Self> {
        config.validate().map_err(|e| {
            candle_core::Error::Msg(format!("{}: invalid config: {e}", config.kind.name()))
        })?;
        let (i, o) = (config.in_features, config.out_features);
        let factor = || {
            config.scaling_factor.ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "{}: the config has no scaling_factor",
                    config.kind.name()
                ))
            })
        };
        Ok(match config.kind {
            ModelKind::SwishScale => Model::SwishScale(SwishScale::load(vb, i, o, factor()?)?),
            ModelKind::SigmoidResidual => {
                Model::SigmoidResidual(SigmoidResidual::load(vb, i, o, factor()?)?)
            }
            ModelKind::ScaleBatchNorm => {
                Model::ScaleBatchNorm(ScaleBatchNorm::load(vb, i, o, config.eps, config.momentum)?)
            }
        })
    }

    /// The same model with its f32 GPU products computed in `precision`.
    pub fn with_precision(self, precision: Precision) -> Self {
        match self {
            Model::SwishScale(m) => Model::SwishScale(m.with_precision(precision)),
            Model::ScaleBatchNorm(m) => Model::ScaleBatchNorm(m.with_precision(precision)),
            Model::SigmoidResidual(m) => Model::SigmoidResidual(m.with_precision(precision)),
        }
    }

    /// The trainable parameters under their PyTorch names.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        match self {
            Model::SwishScale(m) => m.parameters(),
            Model::ScaleBatchNorm(m) => m.parameters(),
            Model::SigmoidResidual(m) => m.parameters(),
        }
    }

    /// The trainable parameters as variables, for candle-nn's optimizers (the BatchNorm buffers,
    /// which a [`VarMap`](candle_nn::VarMap) also holds, are left out). The model must have been
    /// built from a `VarMap`; otherwise the parameters are not variables and this is an error.
    pub fn trainable_vars(&self) -> Result<Vec<Var>> {
        self.parameters()
            .into_iter()
            .map(|(name, t)| {
                if !t.is_variable() {
                    bail!("{name} is not a variable: build the model from a VarMap to train it");
                }
                Var::from_tensor(&t)
            })
            .collect()
    }

    /// The non-trainable state (BatchNorm's running statistics) under PyTorch names.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        match self {
            Model::ScaleBatchNorm(m) => m.buffers(),
            Model::SwishScale(_) | Model::SigmoidResidual(_) => Vec::new(),
        }
    }
}

impl ModuleT for Model {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Model::SwishScale(m) => m.forward(x),
            Model::ScaleBatchNorm(m) => m.forward_t(x, train),
            Model::SigmoidResidual(m) => m.forward(x),
        }
    }
}

impl TracedModuleT for Model {
    fn forward_traced(&self, x: &Tensor, train: bool) -> Result<(Tensor, Trace)> {
        match self {
            Model::SwishScale(m) => m.forward_traced(x, train),
            Model::ScaleBatchNorm(m) => m.forward_traced(x, train),
            Model::SigmoidResidual(m) => m.forward_traced(x, train),
        }
    }
}
