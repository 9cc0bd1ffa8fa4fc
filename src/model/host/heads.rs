//! Attention's head split and merge, with the copies they need made here on the CPU backend.
//!
//! Attention splits each projection `[batch, seq, heads·d_head]` into `[batch, heads, seq, d_head]`
//! with a reshape and a swap of two dimensions: a view, which the products read as it is. Two
//! reshapes cannot be views and copy: merging the heads' context back into `[batch·seq, d_model]`,
//! and, in the backward pass, reshaping the split's gradient. burn's CPU backend copies such a
//! four-dimensional view one element at a time (`StridedIter`): 9.5% of the samples of a
//! length-batched fine-tuning (`perf`, one thread; 4.5% in the merges, 5% in the splits'
//! gradients). On a thread that computes on the host (`mixed::on_host`) both copies are made here,
//! `d_head` contiguous values at a time, blocks spread over rayon's pool, through an operation of
//! burn's autodiff whose backward pass is the other one. Anywhere else they are burn's reshape and
//! swap. A copy moves values and computes none, so every number is the same to the bit.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops};
use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor, TensorData};

use super::{on, on_cpu, on_host, rows, tracked};
use crate::train::backend::{Cpu, CpuTrain};

/// `y` `[batch, seq, heads·d_head]` as `[batch, heads, seq, d_head]` (a view).
pub fn split_heads<B: Backend>(y: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [batch, seq, width] = y.dims();
    let shape = [batch, seq, heads, width / heads];
    let mut y = y;
    // Outside autodiff the view is all there is: no copy to make.
    if on_host() {
        y = match on::<B, CpuTrain, 3, 4>(y, |t| split_tracked(t, shape)) {
            Ok(split) => return split,
            Err(back) => back,
        };
    }
    y.reshape(shape).swap_dims(1, 2)
}

/// `x` `[batch, heads, seq, d_head]` merged into `[batch·seq, heads·d_head]`.
pub fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 2> {
    let [batch, heads, seq, d_head] = x.dims();
    let shape = [batch * seq, heads * d_head];
    let train = |t| merge_tracked(t, [batch, heads, seq, d_head]);
    on_cpu(x, train, |t| merge(t, &shape)).unwrap_or_else(|x| x.swap_dims(1, 2).reshape(shape))
}

/// `t` `[batch, heads, seq, d_head]` with its heads merged, as `shape`, copied here.
fn merge(t: FlexTensor, shape: &[usize]) -> FlexTensor {
    let swapped = t.transpose(1, 2);
    packed(&swapped)
        .unwrap_or_else(|| swapped.to_contiguous())
        .reshape(Shape::from(shape.to_vec()))
}

/// The heads merged under autodiff; the backward pass splits the gradient (a view).
fn merge_tracked(t: FloatTensor<CpuTrain>, dims: [usize; 4]) -> FloatTensor<CpuTrain> {
    let [batch, heads, seq, d_head] = dims;
    tracked(MergeHeads, t, |p| {
        (merge(p, &[batch * seq, heads * d_head]), dims)
    })
}

/// The split under autodiff, a view; the backward pass merges the gradient, copied here.
fn split_tracked(t: FloatTensor<CpuTrain>, shape: [usize; 4]) -> FloatTensor<CpuTrain> {
    tracked(SplitHeads, t, |p| {
        (
            p.reshape(Shape::from(shape.to_vec())).transpose(1, 2),
            shape,
        )
    })
}

#[derive(Debug)]
struct MergeHeads;

impl Backward<Cpu, 1> for MergeHeads {
    /// `[batch, heads, seq, d_head]`, the input's.
    type State = [usize; 4];

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [batch, heads, seq, d_head] = ops.state;
        unary::<Cpu, _>(ops.parents, ops.node, grads, |grad| {
            grad.reshape(Shape::from(vec![batch, seq, heads, d_head]))
                .transpose(1, 2)
        });
    }
}

#[derive(Debug)]
struct SplitHeads;

impl Backward<Cpu, 1> for SplitHeads {
    /// `[batch, seq, heads, d_head]`, the split before its swap.
    type State = [usize; 4];

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [batch, seq, heads, d_head] = ops.state;
        unary::<Cpu, _>(ops.parents, ops.node, grads, |grad| {
            merge(grad, &[batch, seq, heads * d_head])
        });
    }
}

/// `t`, a four-dimensional f32 view with non-negative strides, copied into a contiguous tensor
/// of its shape, a run of its last dimension at a time where that is contiguous; `None` for any
/// other tensor.
fn packed(t: &FlexTensor) -> Option<FlexTensor> {
    let layout: &Layout = t.layout();
    if t.dtype() != DType::F32 || layout.num_dims() != 4 {
        return None;
    }
    let shape = layout.shape();
    let dims = [shape[0], shape[1], shape[2], shape[3]];
    let strides: Vec<usize> = layout
        .strides()
        .iter()
        .map(|&s| usize::try_from(s).ok())
        .collect::<Option<_>>()?;
    let src: &[f32] = t.storage();
    let start = layout.start_offset();
    let count: usize = dims.iter().product();
    // The last element read lies within the storage: then every one does.
    let last: usize = start
        + (0..4)
            .map(|d| dims[d].saturating_sub(1) * strides[d])
            .sum::<usize>();
    if count > 0 && last >= src.len() {
        return None;
    }
    // One `[seq, d_head]` block of a head (or of whatever the second dimension is) per task.
    let copy = |block: usize, out: &mut [f32]| {
        let (i, j) = (block / dims[1], block % dims[1]);
        for (k, out) in out.chunks_mut(dims[3]).enumerate() {
            let base = start + i * strides[0] + j * strides[1] + k * strides[2];
            if strides[3] == 1 {
                out.copy_from_slice(&src[base..base + dims[3]]);
            } else {
                for (l, o) in out.iter_mut().enumerate() {
                    *o = src[base + l * strides[3]];
                }
            }
        }
    };
    let mut out = vec![0.0f32; count];
    rows(&mut out, dims[2] * dims[3], copy);
    Some(FlexTensor::from_data(TensorData::new(out, dims.to_vec())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// The split and merge give, forward and backward, burn's reshapes and swaps to the bit,
    /// with the host path on and off, for the inputs' gradients too.
    #[test]
    fn heads_split_and_merge_are_burns_to_the_bit() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        let [batch, seq, heads, d_head] = [3, 5, 2, 4];
        CpuTrain::seed(&device, 11);
        let input = Tensor::<CpuTrain, 3>::random(
            [batch, seq, heads * d_head],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let weights = Tensor::<CpuTrain, 2>::random(
            [batch * seq, heads * d_head],
            Distribution::Default,
            &device,
        );
        let run = |host: bool| {
            crate::model::mixed::set_host(host);
            let x = input.clone().require_grad();
            let q = split_heads(x.clone(), heads);
            // Products of views, as attention computes them: a strided gradient for the split.
            let scores = q.clone().matmul(q.clone().swap_dims(2, 3));
            let context = scores.matmul(q);
            let merged = merge_heads(context);
            let eval = merge_heads(split_heads(input.clone().inner(), heads).mul_scalar(2.0));
            let loss = (merged.clone() * weights.clone()).sum();
            let grads = loss.backward();
            crate::model::mixed::set_host(false);
            let bits = |d: TensorData| -> Vec<u32> {
                d.to_vec::<f32>()
                    .unwrap_or_default()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            let grad = x.grad(&grads).map(|g| bits(g.into_data()));
            (bits(merged.into_data()), bits(eval.into_data()), grad)
        };
        let (host, burn) = (run(true), run(false));
        assert_eq!(host.0.len(), batch * seq * heads * d_head);
        assert!(host.2.as_ref().is_some_and(|g| g.len() == host.0.len()));
        assert_eq!(host, burn);
    }

    /// The packed copy is the view's values in row-major order, strided last dimension included.
    #[test]
    fn packed_copies_a_view_in_order() {
        // Few enough values for the calling thread, and enough for the pool.
        for dims in [[2, 3, 2, 2], [4, 8, 40, 32]] {
            let count: usize = dims.iter().product();
            let values: Vec<f32> = (0..count).map(|v| v as f32).collect();
            let t = FlexTensor::from_data(TensorData::new(values, dims.to_vec()));
            for view in [
                t.transpose(1, 2),
                t.transpose(2, 3),
                t.permute(&[3, 1, 0, 2]),
            ] {
                let want = view.to_contiguous().into_data().to_vec::<f32>().ok();
                let got = packed(&view).and_then(|p| p.into_data().to_vec::<f32>().ok());
                assert!(want.as_ref().is_some_and(|w| w.len() == count));
                assert_eq!(got, want, "{dims:?}");
            }
        }
    }
}
