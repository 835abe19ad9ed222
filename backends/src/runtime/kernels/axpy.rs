//! The streamed product of a few rows with a band of weight rows: the weight is read
//! once, front to back, four rows per pass over the sums.

use std::ops::Range;

/// `acc[r, j] += sum_{i in band} x[r, i] * w[i, j]`; `x` is `[rows, k]`, `w` is
/// `[k, n]`, `acc` is `[rows, n]`.
pub fn rows_times_band(
    x: &[f32],
    w: &[f32],
    k: usize,
    n: usize,
    band: Range<usize>,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { rows_times_band_avx2(x, w, k, n, band, acc) };
    }
    rows_times_band_portable(x, w, k, n, band, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rows_times_band_avx2(
    x: &[f32],
    w: &[f32],
    k: usize,
    n: usize,
    band: Range<usize>,
    acc: &mut [f32],
) {
    rows_times_band_portable(x, w, k, n, band, acc)
}

#[inline(always)]
fn rows_times_band_portable(
    x: &[f32],
    w: &[f32],
    k: usize,
    n: usize,
    band: Range<usize>,
    acc: &mut [f32],
) {
    // Four weight rows per pass over the sums, so the sums move a quarter as often.
    let mut i = band.start;
    while i + 4 <= band.end {
        let row = |d: usize| &w[(i + d) * n..(i + d + 1) * n];
        let (w0, w1, w2, w3) = (row(0), row(1), row(2), row(3));
        for (r, acc) in acc.chunks_mut(n).enumerate() {
            let xr = &x[r * k + i..r * k + i + 4];
            let (x0, x1, x2, x3) = (xr[0], xr[1], xr[2], xr[3]);
            let columns = acc.iter_mut().zip(w0).zip(w1).zip(w2).zip(w3);
            for ((((a, &a0), &a1), &a2), &a3) in columns {
                *a += x0 * a0 + x1 * a1 + x2 * a2 + x3 * a3;
            }
        }
        i += 4;
    }
    for i in i..band.end {
        let w_row = &w[i * n..(i + 1) * n];
        for (r, acc) in acc.chunks_mut(n).enumerate() {
            let xv = x[r * k + i];
            acc.iter_mut().zip(w_row).for_each(|(a, &w)| *a += xv * w);
        }
    }
}
