//! Batches of token ids: dynamic padding to the longest sequence in the batch, seeded shuffling, and the
//! two self-supervised targets. MLM and AR differ only here (which positions are predicted, from what
//! input) and in the attention mask.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::tokenizer::Specials;

thread_local! {
    /// Token positions `pad` has laid out on this thread: `(with padding, without)`.
    static LAID_OUT: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

thread_local! {
    /// `pad` rounds a batch's length up to a multiple of this (set by `train::backend` for the
    /// device a stage runs on; 1 lays out the longest sequence exactly).
    static MULTIPLE: std::cell::Cell<usize> = const { std::cell::Cell::new(1) };
}

/// Makes `pad` on this thread round lengths up to a multiple of `multiple` (at least 1). On a GPU
/// every new `[batch, seq]` compiles (and tunes) a new set of kernels, so lengths drawn from
/// `1..=max_len` would compile for most batches of a run; multiples of 16 leave a few shapes that
/// compile once.
pub fn set_pad_multiple(multiple: usize) {
    MULTIPLE.with(|m| m.set(multiple.max(1)));
}

/// Token positions `pad` has laid out on this thread so far, `(with padding, without)`. Every
/// batch a model reads is padded by `pad`, so the difference across a training step's loss is what
/// the step fed the model (the training loop's throughput).
pub fn laid_out() -> (u64, u64) {
    LAID_OUT.with(std::cell::Cell::get)
}

/// Sequences padded to a common length, row-major `[batch, seq]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Padded {
    pub ids: Vec<i32>,
    /// `true` where a position is padding.
    pub pad: Vec<bool>,
    pub batch: usize,
    pub seq: usize,
}

/// Positions (flat indices into `[batch * seq]`) whose token is predicted, and the token to predict.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Targets {
    pub positions: Vec<i32>,
    pub targets: Vec<i32>,
}

/// Pads `seqs` to the longest of them, rounded up to this thread's multiple (`set_pad_multiple`)
/// but never past `limit` (the model's positions).
pub fn pad(seqs: &[&[u32]], pad_id: u32, limit: usize) -> Padded {
    let longest = seqs.iter().map(|s| s.len()).max().unwrap_or(1).max(1);
    let multiple = MULTIPLE.with(std::cell::Cell::get);
    let seq = (longest.div_ceil(multiple) * multiple)
        .min(limit)
        .max(longest);
    let tokens: usize = seqs.iter().map(|s| s.len()).sum();
    LAID_OUT.with(|c| {
        let (all, real) = c.get();
        c.set((all + (seqs.len() * seq) as u64, real + tokens as u64));
    });
    let mut ids = Vec::with_capacity(seqs.len() * seq);
    let mut pad = Vec::with_capacity(seqs.len() * seq);
    for s in seqs {
        ids.extend(s.iter().map(|&t| t as i32));
        pad.extend(std::iter::repeat_n(false, s.len()));
        ids.extend(std::iter::repeat_n(pad_id as i32, seq - s.len()));
        pad.extend(std::iter::repeat_n(true, seq - s.len()));
    }
    Padded {
        ids,
        pad,
        batch: seqs.len(),
        seq,
    }
}

/// A reproducible random stream for one purpose of one stage (`seed`, a purpose tag, a counter).
pub fn rng(seed: u64, purpose: u64, counter: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.set_stream(counter);
    r
}

/// Indices `0..n` shuffled for `epoch`, cut into batches.
/// An epoch's batches of row indices into rows of `lengths`, grouped as `batching` says.
/// `Random` is `epoch_batches` exactly.
pub fn batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
    batching: crate::config::train::Batching,
) -> Vec<Vec<usize>> {
    use crate::config::train::Batching;
    match batching {
        Batching::Random => epoch_batches(lengths.len(), batch_size, seed, epoch),
        Batching::Length => {
            let size = batch_size.max(1);
            let mut order: Vec<usize> = (0..lengths.len()).collect();
            order.shuffle(&mut rng(seed, 1, epoch));
            for window in order.chunks_mut(size * 50) {
                window.sort_by_key(|&i| lengths[i]);
            }
            let mut out: Vec<Vec<usize>> = order.chunks(size).map(<[usize]>::to_vec).collect();
            out.shuffle(&mut rng(seed, 2, epoch));
            out
        }
    }
}

/// Evaluation batches: the examples sorted by length (ties in file order) and cut, so each batch
/// is padded to little more than its own examples. The predictions go back to their places, so
/// only the padding computed changes, which is about half of it on FewCLUE's headlines.
pub fn eval_batches(lengths: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    order
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

pub fn epoch_batches(n: usize, batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng(seed, 1, epoch));
    order
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

/// BERT's recipe: each non-special token is selected with probability `prob` (at least one per
/// sequence); a selected token becomes `[MASK]` 80% of the time, a random token 10%, itself 10%.
pub fn mask_mlm(
    batch: &mut Padded,
    specials: &Specials,
    vocab_size: usize,
    prob: f64,
    rng: &mut impl Rng,
) -> Targets {
    let mut out = Targets::default();
    for row in 0..batch.batch {
        let span = row * batch.seq..(row + 1) * batch.seq;
        let candidates: Vec<usize> = span
            .filter(|&i| !batch.pad[i] && !specials.contains(batch.ids[i] as u32))
            .collect();
        let mut chosen: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|_| rng.random::<f64>() < prob)
            .collect();
        if chosen.is_empty() {
            if let Some(&i) = candidates.get(rng.random_range(0..candidates.len().max(1))) {
                chosen.push(i);
            }
        }
        for i in chosen {
            out.positions.push(i as i32);
            out.targets.push(batch.ids[i]);
            let roll = rng.random::<f64>();
            if roll < 0.8 {
                batch.ids[i] = specials.mask as i32;
            } else if roll < 0.9 {
                batch.ids[i] = random_token(specials, vocab_size, rng) as i32;
            }
        }
    }
    out
}

fn random_token(specials: &Specials, vocab_size: usize, rng: &mut impl Rng) -> u32 {
    loop {
        let t = rng.random_range(0..vocab_size as u32);
        if !specials.contains(t) && t != specials.unk {
            return t;
        }
    }
}

/// Sequence packing: `seqs` in a seeded order, concatenated and cut into rows of exactly `len`
/// tokens (the last may be shorter), so a batch carries no padding. Each sequence keeps its
/// `[CLS] … [SEP]` framing and attention crosses the boundaries, as in GPT-2's pretraining and
/// RoBERTa's full-sentences setting.
pub fn pack(seqs: &[Vec<u32>], len: usize, seed: u64) -> Vec<Vec<u32>> {
    const PACKING: u64 = 9;
    let len = len.max(1);
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.shuffle(&mut rng(seed, PACKING, 0));
    let mut rows = Vec::new();
    let mut row = Vec::with_capacity(len);
    for token in order.iter().flat_map(|&i| seqs[i].iter().copied()) {
        row.push(token);
        if row.len() == len {
            rows.push(std::mem::replace(&mut row, Vec::with_capacity(len)));
        }
    }
    if !row.is_empty() {
        rows.push(row);
    }
    rows
}

/// Next-token targets: position `t` predicts the token at `t + 1`, padding never predicted.
pub fn ar_targets(batch: &Padded) -> Targets {
    let mut out = Targets::default();
    for row in 0..batch.batch {
        for t in 0..batch.seq.saturating_sub(1) {
            let next = row * batch.seq + t + 1;
            if !batch.pad[next] {
                out.positions.push((next - 1) as i32);
                out.targets.push(batch.ids[next]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_keeps_every_token_once_in_full_rows() {
        let seqs: Vec<Vec<u32>> = (0..50u32)
            .map(|i| {
                let mut s = vec![2];
                s.extend((0..(i % 7) + 1).map(|k| 100 + i * 10 + k));
                s.push(3);
                s
            })
            .collect();
        let rows = pack(&seqs, 16, 1);
        let total: usize = seqs.iter().map(Vec::len).sum();
        let (last, full) = rows.split_last().unwrap();
        assert!(full.iter().all(|r| r.len() == 16));
        assert!(!last.is_empty() && last.len() <= 16);
        assert_eq!(rows.iter().map(Vec::len).sum::<usize>(), total);
        // Every sequence appears whole and in order: the stream is the sequences, reordered.
        let stream: Vec<u32> = rows.concat();
        let mut starts = 0;
        let mut seen = 0;
        while starts < stream.len() {
            let s = seqs
                .iter()
                .find(|s| stream[starts..].starts_with(s))
                .unwrap();
            starts += s.len();
            seen += 1;
        }
        assert_eq!(seen, seqs.len());
        assert_ne!(stream, seqs.concat(), "the order is shuffled");
        assert_eq!(pack(&seqs, 16, 1), rows, "and seeded");
    }

    const SPECIALS: Specials = Specials {
        pad: 0,
        unk: 1,
        cls: 2,
        sep: 3,
        mask: 4,
    };

    /// Length batching keeps every row exactly once, shrinks the padding, and still mixes the
    /// batches between epochs; random batching is the plain shuffle.
    #[test]
    fn length_batching_cuts_padding_and_keeps_every_row() {
        use crate::config::train::Batching;
        let lengths: Vec<usize> = (0..1000).map(|i| 8 + (i * 37) % 120).collect();
        let padded = |bs: &Vec<Vec<usize>>| -> usize {
            bs.iter()
                .map(|b| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap())
                .sum()
        };
        let random = batches(&lengths, 32, 5, 0, Batching::Random);
        assert_eq!(random, epoch_batches(1000, 32, 5, 0));
        let by_length = batches(&lengths, 32, 5, 0, Batching::Length);
        let mut rows: Vec<usize> = by_length.concat();
        rows.sort();
        assert_eq!(rows, (0..1000).collect::<Vec<_>>());
        let real: usize = lengths.iter().sum();
        assert!(
            padded(&by_length) * 10 < padded(&random) * 7,
            "padding {} vs {} (real {real})",
            padded(&by_length),
            padded(&random)
        );
        assert_ne!(by_length, batches(&lengths, 32, 5, 1, Batching::Length));
    }

    #[test]
    fn evaluation_batches_hold_every_example_once_sorted_by_length() {
        let lengths: Vec<usize> = (0..300).map(|i| 5 + (i * 37) % 41).collect();
        let batches = eval_batches(&lengths, 64);
        assert_eq!(batches.len(), 5);
        let flat: Vec<usize> = batches.concat();
        let mut seen = flat.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..300).collect::<Vec<_>>());
        assert!(flat.windows(2).all(|w| lengths[w[0]] <= lengths[w[1]]));
        // Equal lengths keep their file order.
        assert!(flat
            .windows(2)
            .all(|w| lengths[w[0]] != lengths[w[1]] || w[0] < w[1]));
        let padded = |b: &[Vec<usize>]| -> usize {
            b.iter()
                .map(|b| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap())
                .sum()
        };
        let in_order: Vec<Vec<usize>> = (0..300)
            .collect::<Vec<_>>()
            .chunks(64)
            .map(<[usize]>::to_vec)
            .collect();
        assert!(padded(&batches) * 10 < padded(&in_order) * 8);
    }

    #[test]
    fn padding_marks_the_tail() {
        let b = pad(&[&[2, 7, 3], &[2, 3]], 0, 16);
        assert_eq!(b.ids, vec![2, 7, 3, 2, 3, 0]);
        assert_eq!(b.pad, vec![false, false, false, false, false, true]);
    }

    #[test]
    fn lengths_round_up_to_the_multiple_within_the_limit() {
        let (five, three): (&[u32], &[u32]) = (&[2, 7, 8, 9, 3], &[2, 9, 3]);
        let lengths = |limit| {
            let b = pad(&[five, three], 0, limit);
            assert_eq!(b.ids.len(), 2 * b.seq);
            assert_eq!(b.pad.iter().filter(|&&p| !p).count(), 8, "real tokens kept");
            assert_eq!(&b.ids[..5], [2, 7, 8, 9, 3]);
            assert_eq!(&b.ids[b.seq..b.seq + 3], [2, 9, 3]);
            b.seq
        };
        assert_eq!(lengths(48), 5, "exact by default");
        set_pad_multiple(4);
        assert_eq!(lengths(48), 8);
        assert_eq!(lengths(6), 6, "never past the model's positions");
        assert_eq!(lengths(3), 5, "nor shorter than the longest sequence");
        set_pad_multiple(0);
        assert_eq!(lengths(48), 5, "0 counts as 1");
    }

    #[test]
    fn mlm_follows_the_80_10_10_recipe() {
        let seqs: Vec<Vec<u32>> = (0..400)
            .map(|r| {
                let mut s = vec![2];
                s.extend((0..100).map(|i| 5 + ((r * 7 + i * 13) % 900) as u32));
                s.push(3);
                s
            })
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let original = pad(&refs, 0, 128);
        let mut batch = original.clone();
        let t = mask_mlm(&mut batch, &SPECIALS, 1000, 0.15, &mut rng(7, 2, 0));
        let candidates = 400.0 * 100.0;
        let selected = t.positions.len() as f64;
        assert!((selected / candidates - 0.15).abs() < 0.01, "{selected}");
        let (mut masked, mut kept, mut random) = (0.0, 0.0, 0.0);
        for (&p, &target) in t.positions.iter().zip(&t.targets) {
            let p = p as usize;
            assert_eq!(original.ids[p], target);
            assert!(!SPECIALS.contains(original.ids[p] as u32));
            match batch.ids[p] {
                4 => masked += 1.0,
                x if x == target => kept += 1.0,
                _ => random += 1.0,
            }
        }
        assert!(
            (masked / selected - 0.8).abs() < 0.02,
            "mask {}",
            masked / selected
        );
        assert!(
            (kept / selected - 0.1).abs() < 0.015,
            "keep {}",
            kept / selected
        );
        assert!(
            (random / selected - 0.1).abs() < 0.015,
            "random {}",
            random / selected
        );
        // Unselected positions are untouched.
        let changed = batch
            .ids
            .iter()
            .zip(&original.ids)
            .filter(|(a, b)| a != b)
            .count();
        assert!(changed as f64 <= selected);
    }

    #[test]
    fn ar_predicts_the_next_real_token() {
        let b = pad(&[&[2, 7, 8, 3], &[2, 9, 3]], 0, 16);
        let t = ar_targets(&b);
        assert_eq!(t.positions, vec![0, 1, 2, 4, 5]);
        assert_eq!(t.targets, vec![7, 8, 3, 9, 3]);
    }

    #[test]
    fn shuffling_is_seeded() {
        assert_eq!(epoch_batches(10, 3, 1, 0), epoch_batches(10, 3, 1, 0));
        assert_ne!(epoch_batches(10, 3, 1, 0), epoch_batches(10, 3, 1, 1));
        assert_eq!(epoch_batches(10, 3, 1, 0).len(), 4);
    }
}
