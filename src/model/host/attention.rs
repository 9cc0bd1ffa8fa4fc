//! Scaled dot-product attention with its softmax computed in one pass per row, on every core.
//!
//! burn composes attention's softmax of eight operations, each a pass over the
//! `[batch, heads, seq, keys]` scores on the calling thread: the scale, the padding mask (whose
//! broadcast view it first copies element by element), the causal mask, the row maxima, their
//! subtraction, `exp`, the row sums and the division; and its autodiff runs the gradient of each.
//! In a bert-mini MLM step those were 30% of the training thread's samples, the pool idle
//! meanwhile. Here the products are burn's gemm calls (`matmul`), and the softmax between them
//! is one operation: each row scaled, masked, shifted by its maximum, exponentiated and
//! normalised in one pass, rows spread over rayon's pool; the backward pass computes
//! `scale · p ⊙ (g − ⟨g, p⟩)` for each row, again in one pass.
//!
//! The expressions are burn's (`attention_fallback`): the maximum clamped to the least finite
//! value and the sum to the least positive normal, so a row whose keys are all masked gives zeros,
//! not NaN. Only the order of the row sums differs, so the probabilities agree with burn's to
//! within a few units in the last place, not to the bit. Masks whose values are not one byte each,
//! softcapping and types other than f32 take burn's composition.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention_fallback;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Tensor, TensorData};

use super::matmul::matmul;
use super::{contiguous, cpu, on_cpu, on_host, rows, same, tracked};
use crate::train::backend::Cpu;

/// `softmax(q · kᵀ · scale, masked) · v` for `q` `[batch, heads, seq, d_head]`, `k` and `v`
/// `[batch, heads, keys, d_head]` and `mask` `[batch, heads, seq, keys]` (`true`: masked).
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
    options: AttentionModuleOptions,
) -> Tensor<B, 4> {
    let [.., seq, d_head] = q.dims();
    let keys = k.dims()[2];
    let shape = [q.dims()[0], q.dims()[1], seq, keys];
    let view = (on_host() && cpu::<B>() && options.softcap.is_none() && q.dtype() == DType::F32)
        .then(|| same::<_, FlexTensor>(mask.clone().into_primitive()).ok())
        .flatten()
        .and_then(|m| Mask::new(m, shape, options.is_causal));
    let Some(mask) = view else {
        return attention_fallback(q, k, v, Some(mask), None, options);
    };
    // burn's default scale, and its conversion to the element type.
    let scale = options
        .scale
        .unwrap_or_else(|| 1.0 / (d_head as f64).sqrt()) as f32;
    let scores = matmul(q, k.swap_dims(2, 3));
    let train = |t| {
        tracked(Softmax { scale }, t, |p| {
            let probs = forward(&p, &mask, scale);
            (probs.clone(), probs)
        })
    };
    let probs = on_cpu::<B, 4, 4>(scores, train, |t| forward(&t, &mask, scale))
        .unwrap_or_else(|_| unreachable!("`B` is `Cpu` or `CpuTrain`, on the host"));
    matmul(probs, v)
}

/// Where a row's keys are masked: the padding mask's bytes with their strides, and the causal
/// mask.
struct Mask {
    tensor: FlexTensor,
    /// `[batch, heads, seq, keys]`.
    shape: [usize; 4],
    strides: [usize; 4],
    causal: bool,
}

impl Mask {
    /// `mask` as a view of bytes over `shape`; `None` where its values are not one byte each, its
    /// shape is another or a stride is negative.
    fn new(tensor: FlexTensor, shape: [usize; 4], causal: bool) -> Option<Self> {
        let layout = tensor.layout();
        let dtype = tensor.dtype();
        let dims = layout.shape();
        if !matches!(dtype, DType::Bool(_))
            || dtype.size() != 1
            || layout.num_dims() != 4
            || (0..4).any(|d| dims[d] != shape[d])
        {
            return None;
        }
        let stride = |d: usize| usize::try_from(layout.strides()[d]).ok();
        let strides = [stride(0)?, stride(1)?, stride(2)?, stride(3)?];
        Some(Self {
            tensor,
            shape,
            strides,
            causal,
        })
    }

    /// Whether key `j` of row `row` (counted over batch, heads and queries) is masked, as a
    /// function of `j`.
    fn row(&self, row: usize) -> impl Fn(usize) -> bool + '_ {
        let [_, heads, seq, keys] = self.shape;
        let (b, h, i) = (row / (heads * seq), row / seq % heads, row % seq);
        let [s0, s1, s2, s3] = self.strides;
        let bytes = self.tensor.bytes();
        let base = self.tensor.layout().start_offset() + b * s0 + h * s1 + i * s2;
        // burn's causal mask hides the keys past the query, aligned at the last key.
        let last = i as isize + keys as isize - seq as isize;
        let causal = self.causal;
        move |j| bytes[base + j * s3] != 0 || (causal && j as isize > last)
    }

    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The softmax of each row of `scores · scale`, masked.
fn forward(scores: &FlexTensor, mask: &Mask, scale: f32) -> FlexTensor {
    let scores = contiguous(scores);
    let x: &[f32] = &scores.storage()[..mask.len()];
    let keys = mask.shape[3];
    let mut out = vec![0.0f32; x.len()];
    rows(&mut out, keys, |row, p| {
        let masked = mask.row(row);
        let x = &x[row * keys..(row + 1) * keys];
        for (j, (p, &x)) in p.iter_mut().zip(x).enumerate() {
            *p = if masked(j) {
                f32::NEG_INFINITY
            } else {
                x * scale
            };
        }
        let max = p
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
            .max(f32::MIN);
        let mut sum = 0.0f32;
        for p in p.iter_mut() {
            *p = (*p - max).exp();
            sum += *p;
        }
        let sum = sum.max(f32::MIN_POSITIVE);
        for p in p.iter_mut() {
            *p /= sum;
        }
    });
    FlexTensor::from_data(TensorData::new(out, mask.shape.to_vec()))
}

/// The gradient of the scores, given the probabilities and theirs.
fn backward(probs: &FlexTensor, grad: FlexTensor, scale: f32) -> FlexTensor {
    let shape = probs.layout().shape().to_vec();
    let keys = shape[3];
    let n = shape.iter().product();
    let grad = contiguous(&grad);
    let (g, p): (&[f32], &[f32]) = (&grad.storage()[..n], &probs.storage()[..n]);
    let mut out = vec![0.0f32; p.len()];
    rows(&mut out, keys, |row, d| {
        let range = row * keys..(row + 1) * keys;
        let (p, g) = (&p[range.clone()], &g[range]);
        let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
        for ((d, &p), &g) in d.iter_mut().zip(p).zip(g) {
            *d = scale * (p * (g - dot));
        }
    });
    FlexTensor::from_data(TensorData::new(out, shape))
}

#[derive(Debug, Clone, Copy)]
struct Softmax {
    scale: f32,
}

impl Backward<Cpu, 1> for Softmax {
    /// The probabilities.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let probs = ops.state;
        unary::<Cpu, _>(ops.parents, ops.node, grads, |grad| {
            backward(&probs, grad, self.scale)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::assert_close;
    use super::*;
    use crate::train::backend::CpuTrain;
    use burn::tensor::Distribution;

    /// Attention here gives burn's composition's output and gradients for the queries, keys and
    /// values, to rounding: with padding, causally, with more keys than queries (a prefix's
    /// shape), with a row whose keys are all masked (zeros, not NaN), on rows few enough for the
    /// calling thread and many enough for the pool.
    #[test]
    fn attention_and_its_gradients_are_burns() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        CpuTrain::seed(&device, 3);
        let values = |t: Tensor<CpuTrain, 4>| t.into_data().to_vec::<f32>().unwrap_or_default();
        for [batch, heads, seq, keys, d_head] in
            [[3, 2, 5, 5, 4], [2, 3, 4, 7, 8], [8, 4, 40, 40, 16]]
        {
            let random = |len: usize| {
                Tensor::<CpuTrain, 4>::random(
                    [batch, heads, len, d_head],
                    Distribution::Normal(0.0, 2.0),
                    &device,
                )
            };
            let (q, k, v) = (random(seq), random(keys), random(keys));
            let weights = random(seq);
            // Row 1 pads its last two keys; row 2 masks every key of its first head's queries.
            let masked: Vec<bool> = (0..batch * heads * seq * keys)
                .map(|n| {
                    let (b, h, j) = (n / (heads * seq * keys), n / (seq * keys) % heads, n % keys);
                    (b == 1 && j + 2 >= keys) || (b == 2 && h == 0)
                })
                .collect();
            let mask = Tensor::<CpuTrain, 4, Bool>::from_data(
                TensorData::new(masked, [batch, heads, seq, keys]),
                &device,
            );
            for is_causal in [false, true] {
                let options = AttentionModuleOptions {
                    scale: None,
                    softcap: None,
                    is_causal,
                };
                let run = |host: bool| {
                    crate::model::mixed::set_host(host);
                    let (q, k, v) = (
                        q.clone().require_grad(),
                        k.clone().require_grad(),
                        v.clone().require_grad(),
                    );
                    let out = if host {
                        attention(q.clone(), k.clone(), v.clone(), mask.clone(), options)
                    } else {
                        attention_fallback(
                            q.clone(),
                            k.clone(),
                            v.clone(),
                            Some(mask.clone()),
                            None,
                            options,
                        )
                    };
                    let eval = crate::model::mixed::attend(
                        q.clone().inner(),
                        k.clone().inner(),
                        v.clone().inner(),
                        mask.clone().inner(),
                        options,
                    );
                    let grads = (out.clone() * weights.clone()).sum().backward();
                    crate::model::mixed::set_host(false);
                    let grad = |t: &Tensor<CpuTrain, 4>| {
                        t.grad(&grads)
                            .map(|g| g.into_data().to_vec::<f32>().unwrap_or_default())
                    };
                    let eval = Tensor::<CpuTrain, 4>::from_inner(eval);
                    [
                        Some(values(out)),
                        Some(values(eval)),
                        grad(&q),
                        grad(&k),
                        grad(&v),
                    ]
                };
                let (host, burn) = (run(true), run(false));
                let what = ["output", "evaluation", "queries", "keys", "values"];
                for ((h, b), what) in host.iter().zip(&burn).zip(what) {
                    let (h, b) = (h.as_deref().unwrap(), b.as_deref().unwrap());
                    let case =
                        format!("{what}, [{batch}, {heads}, {seq}, {keys}], causal {is_causal}");
                    assert_close(h, b, &case);
                }
            }
        }
    }
}
