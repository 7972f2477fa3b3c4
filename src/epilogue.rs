//! The epilogue of a fused linear layer: what happens to `z = x·Wᵀ + b` before it is stored.
//!
//! An [`Epilogue`] composes three small pieces, applied per element of `z`:
//!
//! ```text
//! y = act(z) * s + (residual ? z : 0)
//! ```
//!
//! where `act` is an [`Activation`] and `s` an [`OutputScale`] (none, one scalar, or one learned
//! value per output feature). The seed models are instances of it:
//!
//! | model            | activation | scale                  | residual |
//! |------------------|------------|------------------------|----------|
//! | SwishScale       | `Silu`     | `Scalar(f)`            | no       |
//! | SigmoidResidual  | `Sigmoid`  | `Scalar(f)`            | yes      |
//! | ScaleBatchNorm   | `Identity` | `PerFeature` (learned) | no       |
//!
//! This file is the one place where the pointwise math and its derivatives are written for the
//! CPU; the CUDA kernels carry the same formulas in `cuda-kernels/epilogue.cuh`.

use num_traits::Float;

/// A pointwise activation, with the semantics of the PyTorch function of the same name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `act(z) = z`.
    Identity,
    /// `max(z, 0)`, as `torch.relu`: a NaN stays NaN, and the derivative is 0 at 0.
    Relu,
    /// The exact (erf) GELU of `torch.nn.functional.gelu` with `approximate="none"`.
    Gelu,
    /// `z * sigmoid(z)`, also called swish (`torch.nn.functional.silu`).
    Silu,
    /// `1 / (1 + exp(-z))`.
    Sigmoid,
    /// `tanh(z)`.
    Tanh,
}

impl Activation {
    /// All activations, in the order of their numeric codes (see [`Activation::code`]).
    pub const ALL: [Activation; 6] = [
        Activation::Identity,
        Activation::Relu,
        Activation::Gelu,
        Activation::Silu,
        Activation::Sigmoid,
        Activation::Tanh,
    ];

    /// The numeric code shared with the CUDA kernels (`enum Activation` in `epilogue.cuh`).
    pub fn code(self) -> u32 {
        self as u32
    }

    /// `act(z)`.
    pub fn apply<F: Float>(self, z: F) -> F {
        match self {
            Activation::Identity => z,
            // Not `z.max(0)`, which returns 0 for a NaN: torch.relu keeps it.
            Activation::Relu => {
                if z < F::zero() {
                    F::zero()
                } else {
                    z
                }
            }
            Activation::Gelu => {
                z * half::<F>() * (F::one() + erf(z * F::from(FRAC_1_SQRT_2).unwrap()))
            }
            Activation::Silu => z * sigmoid(z),
            Activation::Sigmoid => sigmoid(z),
            Activation::Tanh => z.tanh(),
        }
    }

    /// `act'(z)`, the derivative PyTorch's autograd uses (for relu, 0 at `z = 0`).
    pub fn derivative<F: Float>(self, z: F) -> F {
        match self {
            Activation::Identity => F::one(),
            // As PyTorch's threshold_backward: 0 where z <= 0, so a NaN passes the gradient.
            Activation::Relu => {
                if z <= F::zero() {
                    F::zero()
                } else {
                    F::one()
                }
            }
            Activation::Gelu => {
                let cdf = half::<F>() * (F::one() + erf(z * F::from(FRAC_1_SQRT_2).unwrap()));
                let pdf = (-(z * z) * half::<F>()).exp() * F::from(FRAC_1_SQRT_2PI).unwrap();
                cdf + z * pdf
            }
            Activation::Silu => {
                let s = sigmoid(z);
                s * (F::one() + z * (F::one() - s))
            }
            Activation::Sigmoid => {
                let s = sigmoid(z);
                s * (F::one() - s)
            }
            Activation::Tanh => {
                let t = z.tanh();
                F::one() - t * t
            }
        }
    }
}

impl std::str::FromStr for Activation {
    type Err = candle_core::Error;

    fn from_str(s: &str) -> candle_core::Result<Self> {
        Ok(match s {
            "identity" | "none" => Activation::Identity,
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "silu" | "swish" => Activation::Silu,
            "sigmoid" => Activation::Sigmoid,
            "tanh" => Activation::Tanh,
            other => candle_core::bail!(
                "unknown activation {other:?}: expected one of identity, relu, gelu, silu, swish, sigmoid, tanh"
            ),
        })
    }
}

/// The factor `s` that multiplies the activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OutputScale {
    /// `s = 1`.
    None,
    /// One constant for every element (a module's `scaling_factor`; not trained).
    Scalar(f64),
    /// One learned value per output feature, passed to the op as a tensor of shape `(out,)`.
    PerFeature,
}

/// `y = act(z) * s + (residual ? z : 0)`: see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Epilogue {
    /// The activation applied to the pre-activation `z`.
    pub activation: Activation,
    /// The factor applied to the activation.
    pub scale: OutputScale,
    /// Whether the pre-activation `z` is added back to the scaled activation.
    pub residual: bool,
}

impl Default for Epilogue {
    fn default() -> Self {
        Self::IDENTITY
    }
}

impl Epilogue {
    /// A plain linear layer: `y = z`.
    pub const IDENTITY: Epilogue = Epilogue {
        activation: Activation::Identity,
        scale: OutputScale::None,
        residual: false,
    };

    /// `y = act(z)`.
    pub fn activation(activation: Activation) -> Self {
        Epilogue {
            activation,
            ..Self::IDENTITY
        }
    }

    /// SwishScale's epilogue: `y = z * sigmoid(z) * scaling_factor`.
    pub fn swish_scale(scaling_factor: f64) -> Self {
        Epilogue {
            activation: Activation::Silu,
            scale: OutputScale::Scalar(scaling_factor),
            residual: false,
        }
    }

    /// SigmoidResidual's epilogue: `y = sigmoid(z) * scaling_factor + z`.
    pub fn sigmoid_residual(scaling_factor: f64) -> Self {
        Epilogue {
            activation: Activation::Sigmoid,
            scale: OutputScale::Scalar(scaling_factor),
            residual: true,
        }
    }

    /// ScaleBatchNorm's epilogue before the normalisation: `y = z * scale[feature]`.
    pub fn per_feature_scale() -> Self {
        Epilogue {
            activation: Activation::Identity,
            scale: OutputScale::PerFeature,
            residual: false,
        }
    }

    /// Whether the op takes a per-feature scale tensor.
    pub fn has_scale_param(&self) -> bool {
        self.scale == OutputScale::PerFeature
    }

    /// The scalar factor, or 1 when there is none or it is per feature (then it comes from the
    /// scale tensor).
    pub fn scalar_scale(&self) -> f64 {
        match self.scale {
            OutputScale::Scalar(s) => s,
            OutputScale::None | OutputScale::PerFeature => 1.0,
        }
    }

    /// Whether the backward pass needs the pre-activation `z`. When `y = z * s` with a constant
    /// `s`, the gradient `dz = dy * s` needs nothing from the forward, so nothing is kept.
    pub fn backward_needs_preactivation(&self) -> bool {
        self.activation != Activation::Identity || self.scale == OutputScale::PerFeature
    }

    /// `y` for one element, given `z` and the element's scale `s` (the scalar factor, or the
    /// feature's learned scale).
    #[inline]
    pub fn apply<F: Float>(&self, z: F, s: F) -> F {
        let y = self.activation.apply(z) * s;
        if self.residual {
            y + z
        } else {
            y
        }
    }

    /// `dy/dz` for one element.
    #[inline]
    pub fn derivative<F: Float>(&self, z: F, s: F) -> F {
        let d = self.activation.derivative(z) * s;
        if self.residual {
            d + F::one()
        } else {
            d
        }
    }
}

const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2π)`.
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

fn half<F: Float>() -> F {
    F::from(0.5).unwrap()
}

/// The logistic function, written so that neither branch overflows `exp`.
fn sigmoid<F: Float>(z: F) -> F {
    if z >= F::zero() {
        F::one() / (F::one() + (-z).exp())
    } else {
        let e = z.exp();
        e / (F::one() + e)
    }
}

fn erf<F: Float>(z: F) -> F {
    F::from(candle_core::cpu::erf::erf_f64(z.to_f64().unwrap())).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every derivative agrees with a central difference in f64.
    #[test]
    fn derivatives_match_finite_differences() {
        let h = 1e-6;
        for act in Activation::ALL {
            for residual in [false, true] {
                let epi = Epilogue {
                    activation: act,
                    scale: OutputScale::Scalar(1.7),
                    residual,
                };
                for &z in &[-3.1f64, -0.7, -0.05, 0.3, 1.2, 4.5] {
                    let num = (epi.apply(z + h, 1.7) - epi.apply(z - h, 1.7)) / (2.0 * h);
                    let ana = epi.derivative(z, 1.7);
                    assert!(
                        (num - ana).abs() < 1e-7,
                        "{act:?} residual={residual} z={z}: {num} vs {ana}"
                    );
                }
            }
        }
    }

    #[test]
    fn sigmoid_is_stable_for_large_inputs() {
        assert_eq!(sigmoid(1000.0f32), 1.0);
        assert_eq!(sigmoid(-1000.0f32), 0.0);
        assert!(Activation::Silu.apply(-1000.0f32).abs() < 1e-30);
    }

    #[test]
    fn parses_activation_names() {
        assert_eq!("swish".parse::<Activation>().unwrap(), Activation::Silu);
        assert!("softplus".parse::<Activation>().is_err());
    }
}
