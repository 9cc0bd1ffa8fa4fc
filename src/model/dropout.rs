//! Dropout, with its masks drawn where they cost least.
//!
//! burn's `Dropout` draws its mask through the backend's `random`. On the CPU backend that samples
//! one element at a time, with a new Bernoulli sampler and a ChaCha12 word for each (6.5 ns an
//! element here; 7.5% of a length-batched MLM step), and then scales the product in a second
//! pass. A thread that trains on the CPU draws its masks on the host instead: ChaCha8 in bulk,
//! two bytes an element, compared with the keep probability in 65,536ths and written already
//! scaled by `1 / keep` (about 1 ns an element, and one product fewer), runs of the stream drawn
//! on every core. On a GPU the mask is still drawn on the device: a host mask would cross the bus
//! at every dropout of every step.
//!
//! Both draws are seeded by [`seed`], which every training stage calls with its step's seed, so a
//! seed gives the same masks on a backend, run after run and after a resume. The two draws are not
//! the same numbers: a CPU run and a GPU run of one seed differ, as they did before.

use std::cell::RefCell;

use burn::nn::Dropout;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

thread_local! {
    /// The host generator of the calling thread's masks; `None` where masks are drawn on the
    /// device (the default, and every GPU backend). Per thread, like the device settings in
    /// `pieces`: the thread that starts a backend runs its training, and tests set their own.
    static HOST: RefCell<Option<ChaCha8Rng>> = const { RefCell::new(None) };
}

/// Seed a fresh host generator with when none was seeded yet.
const UNSEEDED: u64 = 0x5EED;

/// Draws the calling thread's dropout masks on the host (`true`: the CPU backend) or through the
/// backend's `random` (`false`).
pub fn draw_on_host(on: bool) {
    HOST.with(|h| *h.borrow_mut() = on.then(|| ChaCha8Rng::seed_from_u64(UNSEEDED)));
}

/// Seeds the backend's random numbers (parameter initialisation, device-drawn masks) and the
/// calling thread's host masks with one seed.
pub fn seed<B: Backend>(device: &B::Device, seed: u64) {
    B::seed(device, seed);
    HOST.with(|h| {
        if let Some(rng) = h.borrow_mut().as_mut() {
            *rng = ChaCha8Rng::seed_from_u64(seed);
        }
    });
}

/// The keep probability of `dropout` on `x`, or `None` where it drops nothing: outside training
/// (no autodiff) or at probability 0. burn's `Dropout::forward` makes the same test.
pub fn keep<B: Backend, const D: usize>(dropout: &Dropout, x: &Tensor<B, D>) -> Option<f64> {
    (B::ad_enabled(&x.device()) && dropout.prob != 0.0).then_some(1.0 - dropout.prob)
}

/// burn's `Dropout::forward`, with the mask from [`mask`].
pub fn forward<B: Backend, const D: usize>(dropout: &Dropout, x: Tensor<B, D>) -> Tensor<B, D> {
    match keep(dropout, &x) {
        Some(keep) => {
            let m = mask(x.dims(), keep, &x);
            x * m
        }
        None => x,
    }
}

/// A dropout mask of `shape` on `like`'s device and dtype: `1 / keep` with probability `keep`,
/// else 0.
pub fn mask<B: Backend, const D: usize, const E: usize>(
    shape: [usize; E],
    keep: f64,
    like: &Tensor<B, D>,
) -> Tensor<B, E> {
    let options = (&like.device(), like.dtype());
    match HOST.with(|h| {
        h.borrow_mut()
            .as_mut()
            .map(|rng| host_mask(rng, &shape, keep))
    }) {
        Some(values) => Tensor::from_data(TensorData::new(values, shape), options),
        None => {
            Tensor::<B, E>::random(shape, Distribution::Bernoulli(keep), options) * (1.0 / keep)
        }
    }
}

/// The values of a mask of `shape` drawn from `rng`: two bytes each, kept below `keep · 65,536`.
///
/// The bytes are the generator's stream in order, as one `fill_bytes` would draw them, but runs of
/// them are drawn on rayon's pool: each run from a copy of the generator set to the run's word of
/// the stream (ChaCha seeks), and the generator left after the last word, where one draw leaves it.
fn host_mask(rng: &mut ChaCha8Rng, shape: &[usize], keep: f64) -> Vec<f32> {
    let n = shape.iter().product::<usize>();
    let threshold = (keep.clamp(0.0, 1.0) * 65_536.0).round() as u32;
    let scale = (1.0 / keep) as f32;
    let start = rng.get_word_pos();
    let draw = |first: usize, values: &mut [f32]| {
        let mut rng = rng.clone();
        // Two values a word: `first` is even.
        rng.set_word_pos(start + (first / 2) as u128);
        let mut bytes = vec![0u8; 2 * values.len()];
        rng.fill_bytes(&mut bytes);
        for (v, b) in values.iter_mut().zip(bytes.chunks_exact(2)) {
            *v = if u32::from(u16::from_le_bytes([b[0], b[1]])) < threshold {
                scale
            } else {
                0.0
            };
        }
    };
    let mut values = vec![0.0f32; n];
    if n <= MASK_RUN {
        draw(0, &mut values);
    } else {
        values
            .par_chunks_mut(MASK_RUN)
            .enumerate()
            .for_each(|(i, run)| draw(i * MASK_RUN, run));
    }
    // A draw of `2n` bytes takes whole words: `⌈n / 2⌉` of them.
    rng.set_word_pos(start + n.div_ceil(2) as u128);
    values
}

/// Mask values a task of the pool draws (even: two a word of the stream); masks of at most this
/// many are drawn on the calling thread.
const MASK_RUN: usize = 1 << 15;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::backend::{Cpu, CpuTrain};

    fn values(t: Tensor<CpuTrain, 2>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    /// Masks of one shape, drawn on the host after `seed(s)` for each seed in `seeds`.
    fn host_masks(seeds: &[u64]) -> Vec<Vec<f32>> {
        let device = Default::default();
        let like = Tensor::<CpuTrain, 2>::zeros([1, 1], &device);
        draw_on_host(true);
        let masks = seeds
            .iter()
            .map(|&s| {
                seed::<CpuTrain>(&device, s);
                values(mask([200, 500], 0.9, &like))
            })
            .collect();
        draw_on_host(false);
        masks
    }

    /// The masks drawn in runs on the pool are one `fill_bytes` of the stream, in order, and leave
    /// the generator where that draw leaves it: masks of an odd size, of whole runs and of a part
    /// run, drawn one after another.
    #[test]
    fn host_masks_are_the_stream_in_order() {
        let sequential = |rng: &mut ChaCha8Rng, n: usize, keep: f64| -> Vec<f32> {
            let threshold = (keep * 65_536.0).round() as u32;
            let mut bytes = vec![0u8; 2 * n];
            rng.fill_bytes(&mut bytes);
            let scale = (1.0 / keep) as f32;
            let value = |b: &[u8]| u32::from(u16::from_le_bytes([b[0], b[1]])) < threshold;
            let v = |b: &[u8]| if value(b) { scale } else { 0.0 };
            bytes.chunks_exact(2).map(v).collect()
        };
        let (mut pooled, mut one) = (ChaCha8Rng::seed_from_u64(5), ChaCha8Rng::seed_from_u64(5));
        for n in [7, 3 * MASK_RUN + 5, 2 * MASK_RUN, 1, MASK_RUN + 1] {
            let a = host_mask(&mut pooled, &[n], 0.9);
            let b = sequential(&mut one, n, 0.9);
            assert_eq!(a, b, "a mask of {n}");
            assert_eq!(
                pooled.get_word_pos(),
                one.get_word_pos(),
                "after a mask of {n}"
            );
        }
        assert!(pooled.next_u32() == one.next_u32());
    }

    #[test]
    fn host_masks_keep_their_share_scaled_and_follow_the_seed() {
        let masks = host_masks(&[3, 3, 4]);
        let keep = 0.9f32;
        for m in &masks {
            assert!(m.iter().all(|&v| v == 0.0 || v == 1.0 / keep));
            let kept = m.iter().filter(|&&v| v > 0.0).count() as f64 / m.len() as f64;
            // 100,000 draws: the standard error of the share is 0.00095.
            assert!((kept - 0.9).abs() < 0.005, "kept share {kept}");
            // A mask's mean stays 1, so dropout leaves the expected activation as it was.
            let mean = m.iter().map(|&v| f64::from(v)).sum::<f64>() / m.len() as f64;
            assert!((mean - 1.0).abs() < 0.006, "mean {mean}");
        }
        assert_eq!(masks[0], masks[1], "one seed, one mask");
        assert_ne!(masks[0], masks[2], "another seed, another mask");
    }

    #[test]
    fn dropout_draws_on_the_host_only_where_asked_and_only_while_training() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        let x = Tensor::<CpuTrain, 2>::ones([64, 64], &device);
        let dropout = burn::nn::DropoutConfig::new(0.25).init();
        // On the device: burn's Bernoulli draw, scaled.
        seed::<CpuTrain>(&device, 1);
        let on_device = values(forward(&dropout, x.clone()));
        draw_on_host(true);
        seed::<CpuTrain>(&device, 1);
        let on_host = values(forward(&dropout, x.clone()));
        // Without autodiff (evaluation) nothing is dropped.
        let plain = forward(&dropout, Tensor::<Cpu, 2>::ones([4, 4], &device));
        draw_on_host(false);
        for m in [&on_device, &on_host] {
            assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        }
        assert_ne!(on_device, on_host, "the host draw is not burn's");
        assert!(plain
            .into_data()
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .all(|&v| v == 1.0));
    }
}
