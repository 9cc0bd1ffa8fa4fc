//! The rows of the last layer that a head reads.
//!
//! A head reads few of the `[batch·seq, d]` rows the last layer produces: the first token of each
//! sequence under `cls` pooling, the last under `last`, the masked positions for MLM (15%), the
//! label positions of a cloze prompt. Past its attention, whose keys and values need every row,
//! a layer works on each row alone (output projection, residual sum, LayerNorm, feed-forward
//! network, adapters). So the last layer computes those parts for the read rows only: for the
//! headline's two layers, half of a fine-tuning step's feed-forward work and GELUs.
//!
//! The function is unchanged, and so are the random draws: a dropout on kept rows draws its mask
//! for every row, as the whole computation does, and keeps the rows' part of it. Only the order in
//! which products sum changes (a weight's gradient sums over fewer rows).

use burn::nn::Dropout;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// The rows a computation keeps of a `[total, d]` activation: all of them in order, or the rows at
/// `index` (flat indices into `batch·seq`, in the order the head reads them).
#[derive(Clone, Debug)]
pub struct Rows<B: Backend> {
    total: usize,
    index: Option<Tensor<B, 1, Int>>,
}

impl<B: Backend> Rows<B> {
    pub fn all(total: usize) -> Self {
        Self { total, index: None }
    }

    pub fn picked(total: usize, index: Tensor<B, 1, Int>) -> Self {
        Self {
            total,
            index: Some(index),
        }
    }

    /// The kept rows of `x` `[total, d]`.
    pub fn keep(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.index {
            Some(index) => x.select(0, index.clone()),
            None => x,
        }
    }

    /// The kept rows in `range` of them: a piece of the work, cut under the device's buffer limit.
    /// Every row kept, each piece draws the masks of its own rows, in order, as the uncut work
    /// does. Some rows kept, each piece draws a mask for every row and keeps its own rows' part:
    /// still a dropout of each row, but not the uncut work's masks. Only LoRA's dropout inside the
    /// feed-forward network is cut so, and only where `[kept rows, d_ff]` outgrows half a device
    /// buffer.
    pub fn narrow(&self, range: &std::ops::Range<usize>) -> Self {
        Self {
            total: self.total,
            index: self
                .index
                .as_ref()
                .map(|i| i.clone().narrow(0, range.start, range.len())),
        }
    }

    /// `dropout.forward` on kept rows `x` `[len, d]`: the mask is drawn for all `total` rows, as
    /// the whole computation draws it, and the kept rows' part applies. So a seed gives the same
    /// masks whichever rows are kept.
    pub fn dropout(&self, dropout: &Dropout, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let Some(index) = &self.index else {
            return super::dropout::forward(dropout, x);
        };
        let Some(keep) = super::dropout::keep(dropout, &x) else {
            return x;
        };
        let [_, d] = x.dims();
        let mask = super::dropout::mask([self.total, d], keep, &x);
        x * mask.select(0, index.clone())
    }
}
