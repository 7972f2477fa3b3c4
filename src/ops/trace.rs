//! Forward calls outside Candle's autograd graph, and their direct backward.
//!
//! Candle's `Tensor::backward` adds every gradient into its store: for a variable met the first
//! time it allocates a zero tensor of the variable's shape and adds the new gradient to it. For
//! a weight that is a memset and an addition the size of the weight, more device traffic than
//! the backward's own GEMMs on the seed models. A [`Trace`] skips the graph: its backward runs
//! the op's fused backward once and hands each gradient over as it is, in a `GradStore` that
//! candle-nn's optimizers take.

use super::ParamRows;
use candle_core::backprop::GradStore;
use candle_core::{bail, CustomOp3, Result, Tensor};
use std::sync::Arc;

/// How a call relates to Candle's graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Graph {
    /// Recorded in Candle's graph when an operand tracks gradients (`Tensor::backward`).
    Autograd,
    /// Run on detached operands, for a [`Trace`].
    Traced,
}

impl Graph {
    /// The operand as the op sees it: itself under autograd, detached when traced so that
    /// Candle records nothing.
    pub(super) fn operand(self, t: &Tensor) -> Tensor {
        match self {
            Graph::Autograd => t.clone(),
            Graph::Traced => t.detach(),
        }
    }

    /// [`Graph::operand`] for several tensors.
    pub(super) fn operands<const N: usize>(self, tensors: [&Tensor; N]) -> [Tensor; N] {
        tensors.map(|t| self.operand(t))
    }

    /// Whether the forward must keep what the backward needs: always when traced; under
    /// autograd exactly when Candle records the op.
    pub(super) fn keeps_for_backward(self, inputs: &[&Tensor]) -> bool {
        match self {
            Graph::Traced => true,
            Graph::Autograd => inputs.iter().any(|t| t.track_op()),
        }
    }
}

/// Which of the op's gradients a traced tensor receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    /// The gradient of `x`.
    Input,
    /// The gradient of the weight.
    Weight,
    /// A row of the parameter table's gradient.
    Row(usize),
}

/// The tensors of a linear call that receive a gradient: `x`, the weight, the bias (row 0 of
/// the parameter table) and the per-feature scale (its row, when the epilogue has one).
pub(super) fn linear_targets(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    scale: Option<&Tensor>,
    rows: &ParamRows,
) -> Vec<(Tensor, Target)> {
    let mut targets = vec![(x.clone(), Target::Input), (weight.clone(), Target::Weight)];
    targets.extend(bias.map(|b| (b.clone(), Target::Row(0))));
    if let (Some(s), Some(row)) = (scale, rows.scale) {
        targets.push((s.clone(), Target::Row(row)));
    }
    targets
}

/// One forward call of a fused op, run outside Candle's autograd graph, with what its backward
/// needs.
///
/// [`Trace::backward`] takes the gradient of the loss at the call's output and returns the
/// gradients of the call's input and parameters, keyed by the tensors that were passed in, so
/// that a candle-nn optimizer's `step` takes them directly:
///
/// ```no_run
/// # use candle_core::{Result, Tensor};
/// # use candle_nn::Optimizer;
/// # fn step(model: &candle_fused::Model, x: &Tensor, dy: impl Fn(&Tensor) -> Result<Tensor>,
/// #         opt: &mut candle_nn::AdamW) -> Result<()> {
/// use candle_fused::TracedModuleT;
/// let (y, trace) = model.forward_traced(x, true)?;
/// let grads = trace.backward(&dy(&y)?)?; // dy: ∂loss/∂y, same shape and dtype as y
/// opt.step(&grads)?;
/// # Ok(()) }
/// ```
///
/// A trace holds, until it is dropped, the call's operands, its output `y` (the tensor the call
/// returned, shared, not copied), the pre-activation `z` where the backward needs it (one
/// `batch × out` tensor; not for an epilogue that is a constant factor) and, for BatchNorm, the
/// `(2, out)` statistics. Calling `backward` twice gives the same gradients twice; gradients are
/// never accumulated from one call to the next.
pub struct Trace {
    op: Arc<Box<dyn CustomOp3 + Send + Sync>>,
    /// `x`, the weight and the op's third input (the parameter table, or its first vector when
    /// the op holds the others), as the forward saw them.
    operands: [Tensor; 3],
    /// The op's output, `(batch, out)` (its dtype and device are what `backward` expects).
    y: Tensor,
    /// The output's shape as the caller got it: `y`'s, or `(..., out)` for an input with other
    /// leading dimensions than one batch.
    output_dims: Vec<usize>,
    /// The tensors given to the call that receive a gradient, and which one.
    targets: Vec<(Tensor, Target)>,
}

impl std::fmt::Debug for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trace")
            .field("op", &self.op.name())
            .field("output", &self.output_dims)
            .field("gradients", &self.targets.len())
            .finish()
    }
}

impl Trace {
    pub(super) fn new(
        op: Arc<Box<dyn CustomOp3 + Send + Sync>>,
        operands: [Tensor; 3],
        y: &Tensor,
        output_dims: &[usize],
        targets: Vec<(Tensor, Target)>,
    ) -> Self {
        Self {
            op,
            operands,
            y: y.clone(),
            output_dims: output_dims.to_vec(),
            targets,
        }
    }

    /// The gradients of the call's input and parameters given `dy`, the gradient of the loss at
    /// the call's output (same shape, dtype and device). The store maps each tensor passed to
    /// the call (the input, the weight, the bias, the scale, BatchNorm's weight and bias) to its
    /// gradient, the sum of them for a tensor passed in more than one place; BatchNorm's
    /// running statistics get none.
    pub fn backward(&self, dy: &Tensor) -> Result<GradStore> {
        let name = self.op.name();
        if dy.dims() != self.output_dims {
            bail!(
                "{name} backward: the output gradient has shape {:?} but the output has {:?}",
                dy.dims(),
                self.output_dims
            );
        }
        if dy.dtype() != self.y.dtype() {
            bail!(
                "{name} backward: the output gradient is {:?} but the output is {:?}",
                dy.dtype(),
                self.y.dtype()
            );
        }
        if !dy.device().same_device(self.y.device()) {
            bail!("{name} backward: the output gradient is on another device than the output");
        }
        let [x, w, p] = &self.operands;
        let dy = dy.detach().reshape(self.y.shape())?;
        let (dx, dw, dp) = self.op.bwd(x, w, p, &self.y, &dy)?;
        let (Some(dx), Some(dw), Some(dp)) = (dx, dw, dp) else {
            bail!("{name} backward: the op returned no gradient for an operand")
        };
        let mut grads = GradStore::default();
        for (tensor, target) in &self.targets {
            let grad = match target {
                Target::Input => dx.reshape(tensor.shape())?,
                Target::Weight => dw.clone(),
                Target::Row(row) => dp.get(*row)?,
            };
            // A tensor passed in two places (a tied weight) gets the sum of its gradients, as
            // under autograd.
            let grad = match grads.remove(tensor) {
                Some(other) => (other + grad)?,
                None => grad,
            };
            grads.insert(tensor, grad);
        }
        Ok(grads)
    }
}
