//! Work cut into pieces that each fit one device buffer.
//!
//! A GPU runtime holds every tensor in one buffer, and wgpu caps a buffer at the adapter's
//! `max_storage_buffer_binding_size` (2 GiB at most; far less on some adapters). A tensor past it
//! is a panic inside the runtime, not an error. Two of the model's tensors grow much faster than
//! the rest: attention scores `[batch, heads, seq, seq]` (and their mask) with the square of the
//! length, and the LM head's logits `[positions, vocab]` with the vocabulary. Both are computed in
//! pieces along their first axis that each stay under half the limit, and the feed-forward
//! network's `[rows, d_ff]` activations with them. Where everything fits, which is every run with
//! no limit (the CPU), there is one piece and the computation is exactly the uncut one.

use std::cell::Cell;
use std::ops::Range;

thread_local! {
    /// The largest buffer the training device allows, in bytes; `u64::MAX` for none. Per thread:
    /// the thread that starts a backend builds every tensor operation it runs (a GPU runtime's
    /// own threads only execute them), and tests set their own.
    static MAX_BUFFER: Cell<u64> = const { Cell::new(u64::MAX) };
}

/// Bytes counted per element: f32's, also the width of a bool on wgpu. Half-precision runs are
/// cut as if f32, into at most twice the pieces they need.
pub const ELEMENT_BYTES: u64 = 4;

/// Records the training device's buffer limit (`None`: no limit) for the calling thread.
pub fn set_max_buffer(bytes: Option<u64>) {
    MAX_BUFFER.with(|m| m.set(bytes.unwrap_or(u64::MAX)));
}

/// The calling thread's device buffer limit in bytes (`u64::MAX` for none).
pub fn max_buffer() -> u64 {
    MAX_BUFFER.with(Cell::get)
}

/// `rows` cut into consecutive ranges of at most `limit / 2` bytes each, a row being `row_bytes`
/// (half the limit: the runtime rounds sizes up to its alignment). At least one row per piece;
/// one piece when everything fits.
pub fn pieces(rows: usize, row_bytes: u64, limit: u64) -> Vec<Range<usize>> {
    let per = (limit / 2 / row_bytes.max(1)).max(1);
    let per = usize::try_from(per).unwrap_or(usize::MAX).max(1);
    if rows <= per {
        return std::iter::once(0..rows).collect();
    }
    (0..rows)
        .step_by(per)
        .map(|start| start..(start + per).min(rows))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_rows_in_order_under_half_the_limit() {
        assert_eq!(pieces(10, 4, u64::MAX), vec![0..10]);
        assert_eq!(pieces(10, 4, 80), vec![0..10]);
        assert_eq!(pieces(10, 4, 32), vec![0..4, 4..8, 8..10]);
        // A row larger than the limit still makes a piece of its own.
        assert_eq!(pieces(2, 100, 32), vec![0..1, 1..2]);
        assert_eq!(pieces(0, 4, 32), vec![0..0]);
    }
}
