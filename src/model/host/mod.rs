//! Operations computed here, on the host, where the thread's backend is the CPU backend.
//!
//! burn's CPU backend computes its matrix products on rayon's pool, every core at work, and every
//! other operation one element at a time on the thread that calls it, while the pool waits. On
//! two cores that serial share was 63% of a bert-mini MLM step's wall time (`perf`, per thread;
//! BENCHMARKS.md, "GELU on every core"). The operations here take the largest parts of it onto
//! the pool, or copy with fewer passes:
//! - `heads`: attention's head split and merge, copied `d_head` values at a time;
//! - `gelu`: GELU and its gradient, on every core, to the bit what the backend computes;
//! - `attention`: attention's softmax and its gradient in one pass per row, on every core;
//! - `layer_norm`: LayerNorm and its gradients in one pass per row, on every core;
//! - `linear`: projections and their gradients, gemm writing into outputs nothing has cleared
//!   or copied, the bias and its gradient on every core;
//! - `matmul`: attention's batched products and their gradients, gemm writing into outputs
//!   nothing has cleared or copied;
//! - `log_probs`: the LM head's log-probabilities of its targets, in one pass per row, on every
//!   core, without the `[rows, vocab]` log-softmax.
//!
//! Each is an operation of burn's autodiff on `CpuTrain` and a plain one on `Cpu`, taken where
//! `mixed::on_host` says the thread computes on the host and the tensor's backend is one of those
//! two; anywhere else (a GPU, a test's other backend) the function is burn's own.

mod attention;
mod gelu;
mod heads;
mod layer_norm;
mod linear;
mod log_probs;
mod matmul;

pub use attention::attention;
pub use gelu::gelu;
pub use heads::{merge_heads, split_heads};
pub use layer_norm::layer_norm;
pub use linear::linear;
pub use log_probs::target_log_probs;

use std::any::{Any, TypeId};
use std::fmt::Debug;

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::ops::{Backward, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};
use rayon::prelude::*;

use super::mixed::on_host;
use crate::train::backend::{Cpu, CpuTrain};

/// Whether `B` is the CPU backend, with autodiff or without.
fn cpu<B: Backend>() -> bool {
    [TypeId::of::<Cpu>(), TypeId::of::<CpuTrain>()].contains(&TypeId::of::<B>())
}

/// `f` applied to `x`'s primitive where `B` is `T`; else `x` back.
fn on<B: Backend, T: Backend, const D: usize, const E: usize>(
    x: Tensor<B, D>,
    f: impl FnOnce(FloatTensor<T>) -> FloatTensor<T>,
) -> Result<Tensor<B, E>, Tensor<B, D>> {
    if TypeId::of::<B>() != TypeId::of::<T>() {
        return Err(x);
    }
    let out = f(primitive::<T, B, D>(x));
    let out = same::<_, FloatTensor<B>>(out).unwrap_or_else(|_| unreachable!("`T` is `B`"));
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

/// `x` through `train` where `B` is `CpuTrain` and through `plain` where it is `Cpu`, on a thread
/// that computes on the host; else `x` back, for burn's own function.
fn on_cpu<B: Backend, const D: usize, const E: usize>(
    x: Tensor<B, D>,
    train: impl FnOnce(FloatTensor<CpuTrain>) -> FloatTensor<CpuTrain>,
    plain: impl FnOnce(FlexTensor) -> FlexTensor,
) -> Result<Tensor<B, E>, Tensor<B, D>> {
    if !on_host() {
        return Err(x);
    }
    match on::<B, CpuTrain, D, E>(x, train) {
        Ok(y) => Ok(y),
        Err(x) => on::<B, Cpu, D, E>(x, plain),
    }
}

/// `x` as a `T` where `F` is `T`; else `x` back.
fn same<F: 'static, T: 'static>(x: F) -> Result<T, F> {
    let mut slot = Some(x);
    let taken = (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<T>>()
        .and_then(Option::take);
    match (taken, slot) {
        (Some(t), _) => Ok(t),
        (None, Some(x)) => Err(x),
        (None, None) => unreachable!("taken only when it is a `T`"),
    }
}

/// `forward` of `t`'s values as an operation of burn's autodiff whose backward pass is `op`'s;
/// `forward` returns the output and what the backward pass keeps of the step.
fn tracked<S, O>(
    op: O,
    t: FloatTensor<CpuTrain>,
    forward: impl FnOnce(FlexTensor) -> (FlexTensor, S),
) -> FloatTensor<CpuTrain>
where
    S: Clone + Send + Debug + 'static,
    O: Backward<Cpu, 1, State = S>,
{
    let parent = t.clone();
    tracked_by(op, [&parent], || forward(t.primitive))
}

/// `forward()` as an operation of burn's autodiff with `parents`, whose backward pass is `op`'s;
/// `forward` returns the output and what the backward pass keeps of the step.
fn tracked_by<S, O, const N: usize>(
    op: O,
    parents: [&FloatTensor<CpuTrain>; N],
    forward: impl FnOnce() -> (FlexTensor, S),
) -> FloatTensor<CpuTrain>
where
    S: Clone + Send + Debug + 'static,
    O: Backward<Cpu, N, State = S>,
{
    match op
        .prepare::<NoCheckpointing>(parents.map(|p| p.node.clone()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, state) = forward();
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward().0),
    }
}

/// `t`'s primitive as a `T`'s, where `B` is `T` (the caller has checked it).
fn primitive<T: Backend, B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<T> {
    let TensorPrimitive::Float(p) = t.into_primitive() else {
        unreachable!("a float tensor of `T` is not quantized here")
    };
    same::<_, FloatTensor<T>>(p).unwrap_or_else(|_| unreachable!("`B` is `T`"))
}

/// Elements below which a map stays on the calling thread, and the fewest one task of the pool
/// takes: handing work to the pool and waiting for it costs a few microseconds.
const GRAIN: usize = 1 << 14;

/// `f` of each of `x`'s values, computed on rayon's pool.
fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    if x.len() < 2 * GRAIN {
        return x.iter().map(|&v| f(v)).collect();
    }
    x.par_iter().with_min_len(GRAIN).map(|&v| f(v)).collect()
}

/// `f` of each pair of `x`'s and `y`'s values (of one length), computed on rayon's pool.
fn zip_map(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    debug_assert_eq!(x.len(), y.len());
    if x.len() < 2 * GRAIN {
        return x.iter().zip(y).map(|(&a, &b)| f(a, b)).collect();
    }
    x.par_iter()
        .zip(y)
        .with_min_len(GRAIN)
        .map(|(&a, &b)| f(a, b))
        .collect()
}

/// `f(row, values)` for each row of `width` values of `out`, rows spread over rayon's pool.
fn rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let mut none = vec![(); out.len().div_ceil(width.max(1))];
    rows_and(out, width, &mut none, |r, v, _| f(r, v));
}

/// `f(row, values, extra)` for each row of `width` values of `out` and its value of `extra` (one a
/// row), rows spread over rayon's pool.
fn rows_and<T: Send>(
    out: &mut [f32],
    width: usize,
    extra: &mut [T],
    f: impl Fn(usize, &mut [f32], &mut T) + Sync + Send,
) {
    let width = width.max(1);
    debug_assert_eq!(out.len().div_ceil(width), extra.len());
    if out.len() < 2 * GRAIN {
        out.chunks_mut(width)
            .zip(extra)
            .enumerate()
            .for_each(|(r, (v, e))| f(r, v, e));
    } else {
        out.par_chunks_mut(width)
            .zip(extra)
            .enumerate()
            .with_min_len(GRAIN.div_ceil(width))
            .for_each(|(r, (v, e))| f(r, v, e));
    }
}

/// `f(first, sums)` for runs of `out`'s values (a value per column, `first` the run's first
/// column), one run per thread of rayon's pool; `work` is the values `f` reads in all, which
/// keeps small sums on the calling thread. For sums over rows kept in each column's order.
fn columns(out: &mut [f32], work: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let threads = rayon::current_num_threads();
    if work < 2 * GRAIN || threads < 2 {
        f(0, out);
    } else {
        let width = out.len().div_ceil(threads).max(16);
        out.par_chunks_mut(width)
            .enumerate()
            .for_each(|(i, sums)| f(i * width, sums));
    }
}

/// `t` itself where it is a contiguous f32 tensor from its storage's start; else a copy that is.
fn contiguous(t: &FlexTensor) -> FlexTensor {
    let layout = t.layout();
    if layout.is_contiguous() && layout.start_offset() == 0 {
        t.clone()
    } else {
        t.to_contiguous()
    }
}

/// The bits of `t`'s f32 values, to compare two computations to the bit.
#[cfg(test)]
fn bits<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<u32> {
    let values = t.into_data().to_vec::<f32>().unwrap_or_default();
    values.iter().map(|v| v.to_bits()).collect()
}

/// Asserts that `host` holds as many values as `burn`, some, all finite, each within 1e-5 of the
/// largest of `burn`'s magnitudes (or of 1): the same numbers to rounding.
#[cfg(test)]
fn assert_close(host: &[f32], burn: &[f32], case: &str) {
    assert_eq!(host.len(), burn.len(), "{case}");
    assert!(!burn.is_empty(), "{case}: no values");
    assert!(host.iter().all(|x| x.is_finite()), "{case}: not finite");
    let worst = host
        .iter()
        .zip(burn)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    let size = burn.iter().map(|y| y.abs()).fold(0.0, f32::max);
    assert!(worst <= 1e-5 * size.max(1.0), "{case}: {worst} off");
}
