//! Matrix products with gemm writing straight into each output, as burn's CPU backend calls it.
//!
//! burn's CPU backend builds a product's output zeroed and then copies it into a buffer of its
//! runtime's alignment before gemm writes it: two passes over every output, on the training
//! thread while the pool waits. Here gemm is called as the backend calls it (the same strides, the
//! same thresholds for the pool, one call per matrix of a batch) but writes into a buffer nothing
//! has cleared, so every value is the backend's, to the bit. `linear` builds projections on
//! [`product`]; [`matmul`] is attention's batched products `[batch, heads, ·, ·]` and their
//! gradients.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use super::{on_cpu, primitive, tracked_by};
use crate::train::backend::{Cpu, CpuTrain};

/// A 2-d f32 tensor as gemm reads it: its values from its first, and its strides.
pub(super) struct Matrix<'a> {
    values: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl<'a> Matrix<'a> {
    /// `t` as a matrix; `None` where it is not a 2-d f32 tensor with strides of at least zero.
    pub fn of(t: &'a FlexTensor) -> Option<Self> {
        let layout = t.layout();
        let (shape, strides) = (layout.shape(), layout.strides());
        if t.dtype() != DType::F32 || shape.num_dims() != 2 {
            return None;
        }
        let values = t.storage::<f32>().get(layout.start_offset()..)?;
        Self::within(values, [shape[0], shape[1]], [strides[0], strides[1]])
    }

    /// The `dims` matrix with `strides` from `values`' first; `None` where a stride is negative or
    /// a value gemm would read lies past `values`.
    fn within(values: &'a [f32], dims: [usize; 2], strides: [isize; 2]) -> Option<Self> {
        if strides.iter().any(|&s| s < 0) {
            return None;
        }
        let [rows, cols] = dims;
        let last = rows.saturating_sub(1) * strides[0] as usize
            + cols.saturating_sub(1) * strides[1] as usize;
        (rows * cols == 0 || last < values.len()).then_some(Self {
            values,
            rows,
            cols,
            row_stride: strides[0],
            col_stride: strides[1],
        })
    }

    /// The transpose: the same values, strides swapped.
    pub fn t(&self) -> Self {
        Self {
            values: self.values,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// The value at (`row`, `col`).
    pub fn at(&self, row: usize, col: usize) -> f32 {
        self.values[row * self.row_stride as usize + col * self.col_stride as usize]
    }
}

/// Products below this many multiply-adds stay on the calling thread, and a batch of products
/// below `BATCH` in all: the backend's thresholds.
const POOL: usize = 192 * 192 * 192;
const BATCH: usize = 128 * 128 * 128;

/// `lhs · rhs` (`[m, k] · [k, n]`), row-major `[m, n]`, by the gemm call the backend makes.
pub(super) fn product(lhs: &Matrix, rhs: &Matrix) -> Vec<f32> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let parallel = m.saturating_mul(n).saturating_mul(k) >= POOL;
    let mut out = Vec::<f32>::with_capacity(m * n);
    gemm_into(out.spare_capacity_mut(), lhs, rhs, parallel);
    // SAFETY: `gemm_into` wrote every one of the `m · n` values.
    unsafe { out.set_len(m * n) };
    out
}

/// `lhs · rhs` written row-major into `out` (`m · n` values), gemm on the pool where `parallel`.
/// With `read_dst` false gemm writes each value of `out` (zeros where `k` is 0) and reads none it
/// has not written.
fn gemm_into(out: &mut [std::mem::MaybeUninit<f32>], lhs: &Matrix, rhs: &Matrix, parallel: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(k, rhs.rows, "a product's inner dimensions");
    assert!(out.len() >= m * n, "a product's output");
    if m * n == 0 {
        return;
    }
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `Matrix::within` checked that every value gemm reads of `lhs` and `rhs` lies in
    // their slices; `out` has room for the `m · n` values written with row stride `n`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr().cast::<f32>(),
            1,
            n as isize,
            false,
            lhs.values.as_ptr(),
            lhs.col_stride,
            lhs.row_stride,
            rhs.values.as_ptr(),
            rhs.col_stride,
            rhs.row_stride,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A 4-d f32 tensor as a batch of matrices `[outer, inner, rows, cols]`.
struct Stack<'a> {
    values: &'a [f32],
    dims: [usize; 4],
    strides: [isize; 4],
}

impl<'a> Stack<'a> {
    /// `t` as a batch of matrices; `None` where it is not a 4-d f32 tensor with strides of at
    /// least zero.
    fn of(t: &'a FlexTensor) -> Option<Self> {
        let layout = t.layout();
        let (shape, strides) = (layout.shape(), layout.strides());
        if t.dtype() != DType::F32 || shape.num_dims() != 4 || strides.iter().any(|&s| s < 0) {
            return None;
        }
        let stack = Self {
            values: t.storage::<f32>().get(layout.start_offset()..)?,
            dims: [shape[0], shape[1], shape[2], shape[3]],
            strides: [strides[0], strides[1], strides[2], strides[3]],
        };
        // Every matrix lies inside the storage (`matrix` checks the last one).
        (stack.count() == 0 || stack.matrix(stack.count() - 1).is_some()).then_some(stack)
    }

    fn count(&self) -> usize {
        self.dims[0] * self.dims[1]
    }

    /// The `b`-th matrix, in row-major order of the two batch dimensions.
    fn matrix(&self, b: usize) -> Option<Matrix<'a>> {
        let (outer, inner) = (b / self.dims[1], b % self.dims[1]);
        let offset = outer * self.strides[0] as usize + inner * self.strides[1] as usize;
        let values = self.values.get(offset..)?;
        Matrix::within(
            values,
            [self.dims[2], self.dims[3]],
            [self.strides[2], self.strides[3]],
        )
    }
}

/// `lhs · rhs` of each pair of matrices, `[outer, inner, m, n]` row-major, by the gemm calls the
/// backend makes: one per matrix, each on the pool where a matrix is large and the batch short,
/// the batch spread over the pool where it is large in all; `None` where the batches differ.
fn products(lhs: &Stack, rhs: &Stack) -> Option<FlexTensor> {
    let [outer, inner, m, k] = lhs.dims;
    let n = rhs.dims[3];
    if lhs.dims[..2] != rhs.dims[..2] || rhs.dims[2] != k {
        return None;
    }
    let (count, size) = (lhs.count(), m * n);
    let per = m.saturating_mul(n).saturating_mul(k);
    let total = count.saturating_mul(per);
    let mut out = Vec::<f32>::with_capacity(count * size);
    let slots = &mut out.spare_capacity_mut()[..count * size];
    let one = |b: usize, slot: &mut [std::mem::MaybeUninit<f32>], parallel: bool| {
        let (Some(l), Some(r)) = (lhs.matrix(b), rhs.matrix(b)) else {
            unreachable!("`Stack::of` checked every matrix")
        };
        gemm_into(slot, &l, &r, parallel);
    };
    if size > 0 {
        let batch_parallel = count >= 4 && total >= BATCH;
        if per >= POOL && !batch_parallel {
            slots
                .chunks_mut(size)
                .enumerate()
                .for_each(|(b, s)| one(b, s, true));
        } else if total >= BATCH && count > 1 {
            slots
                .par_chunks_mut(size)
                .enumerate()
                .for_each(|(b, s)| one(b, s, false));
        } else {
            slots
                .chunks_mut(size)
                .enumerate()
                .for_each(|(b, s)| one(b, s, false));
        }
    }
    // SAFETY: each matrix's gemm wrote its `m · n` values.
    unsafe { out.set_len(count * size) };
    Some(FlexTensor::from_data(TensorData::new(
        out,
        [outer, inner, m, n],
    )))
}

/// `lhs.matmul(rhs)` for `lhs` `[outer, inner, m, k]` and `rhs` `[outer, inner, k, n]`.
pub fn matmul<B: Backend>(lhs: Tensor<B, 4>, rhs: Tensor<B, 4>) -> Tensor<B, 4> {
    let train = |l: FloatTensor<CpuTrain>| tracked(l, primitive::<CpuTrain, B, 4>(rhs.clone()));
    let plain = |l: FlexTensor| {
        let r = primitive::<Cpu, B, 4>(rhs.clone());
        plain(&l, &r).unwrap_or_else(|| Cpu::float_matmul(l, r))
    };
    on_cpu(lhs, train, plain).unwrap_or_else(|lhs| lhs.matmul(rhs.clone()))
}

fn plain(lhs: &FlexTensor, rhs: &FlexTensor) -> Option<FlexTensor> {
    products(&Stack::of(lhs)?, &Stack::of(rhs)?)
}

fn tracked(lhs: FloatTensor<CpuTrain>, rhs: FloatTensor<CpuTrain>) -> FloatTensor<CpuTrain> {
    let Some(out) = plain(&lhs.primitive, &rhs.primitive) else {
        return CpuTrain::float_matmul(lhs, rhs);
    };
    let state = State {
        lhs: rhs.is_tracked().then(|| lhs.primitive.clone()),
        rhs: lhs.is_tracked().then(|| rhs.primitive.clone()),
    };
    tracked_by(Product, [&lhs, &rhs], || (out, state))
}

#[derive(Debug)]
struct Product;

#[derive(Clone, Debug)]
struct State {
    /// The left operand, where the right one's gradient is asked for.
    lhs: Option<FlexTensor>,
    /// The right operand, where the left one's gradient is asked for.
    rhs: Option<FlexTensor>,
}

impl Backward<Cpu, 2> for Product {
    type State = State;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Cpu>(&ops.node);
        let [l, r] = ops.parents;
        let State { lhs, rhs } = ops.state;
        // burn's `Matmul` backward: `g · rhsᵀ` and `lhsᵀ · g`.
        let transposed = |t: &FlexTensor| Cpu::float_swap_dims(t.clone(), 2, 3);
        let product = |a: FlexTensor, b: FlexTensor| {
            let out = Stack::of(&a)
                .zip(Stack::of(&b))
                .and_then(|(x, y)| products(&x, &y));
            out.unwrap_or_else(|| Cpu::float_matmul(a, b))
        };
        if let (Some(node), Some(rhs)) = (l, &rhs) {
            grads.register::<Cpu>(node.id, product(grad.clone(), transposed(rhs)));
        }
        if let (Some(node), Some(lhs)) = (r, &lhs) {
            grads.register::<Cpu>(node.id, product(transposed(lhs), grad));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::bits;
    use super::*;
    use burn::tensor::Distribution;

    /// Batched products here are the backend's to the bit, with both operands' gradients: on
    /// batches few and small enough for the calling thread, large enough to spread the batch
    /// over the pool, and of matrices large enough for gemm's own threads; on a transposed and a
    /// head-split view as attention passes them; and outside autodiff.
    #[test]
    fn batched_products_are_burns_to_the_bit() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        CpuTrain::seed(&device, 17);
        for [outer, inner, m, k, n] in [[1, 2, 3, 4, 5], [8, 4, 64, 16, 64], [1, 2, 200, 256, 200]]
        {
            let random = |dims: [usize; 4]| {
                Tensor::<CpuTrain, 4>::random(dims, Distribution::Default, &device)
            };
            let (a, b) = (random([outer, inner, m, k]), random([outer, inner, n, k]));
            // `[outer, m, inner, k]` seen as `[outer, inner, m, k]`, as split heads are.
            let split = random([outer, m, inner, k]);
            let weights = random([outer, inner, m, n]);
            let run = |host: bool| {
                crate::model::mixed::set_host(host);
                let (x, y) = (a.clone().require_grad(), b.clone().require_grad());
                let s = split.clone().require_grad();
                let out = matmul(x.clone(), y.clone().swap_dims(2, 3));
                let views = matmul(s.clone().swap_dims(1, 2), y.clone().swap_dims(2, 3));
                let eval = matmul(a.clone().inner(), b.clone().inner().swap_dims(2, 3));
                let loss =
                    (out.clone() * weights.clone()).sum() + (views.clone() * weights.clone()).sum();
                let grads = loss.backward();
                crate::model::mixed::set_host(false);
                let eval = Tensor::<CpuTrain, 4>::from_inner(eval);
                let outputs = [out, views, eval].map(bits);
                let grads = [x.grad(&grads), y.grad(&grads), s.grad(&grads)].map(|g| g.map(bits));
                (outputs, grads)
            };
            let (host, burn) = (run(true), run(false));
            let case = format!("[{outer}, {inner}, {m}, {k}] · [{k}, {n}]");
            assert_eq!(host.0[0].len(), outer * inner * m * n, "{case}");
            assert!(host.1.iter().all(Option::is_some), "{case}");
            assert_eq!(host, burn, "{case}");
        }
    }
}
