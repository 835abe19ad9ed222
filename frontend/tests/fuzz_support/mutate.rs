//! Byte-level mutations of a seed input, and the "interesting" integers that structure-aware
//! mutations write into length and count fields.
//!
//! Positions are drawn as plain integers and taken modulo the current length when a
//! mutation is applied, so any mutation applies to any input and shrinks towards the start.

use proptest::collection::vec;
use proptest::prelude::*;

/// An integer to write into a length, count, offset or dimension field.
#[derive(Clone, Copy, Debug)]
pub enum Num {
    /// One of [`EXTREMES`].
    Extreme(usize),
    /// A small value.
    Small(u8),
    /// The input's length plus `delta` (just past the end, or just inside it).
    PastEnd(i8),
}

/// Values that break careless size arithmetic: maxima, sign bits, powers of two.
pub const EXTREMES: &[u64] = &[
    0,
    1,
    u64::MAX,
    u64::MAX - 1,
    1 << 63,
    (1 << 63) - 1,
    (-2i64) as u64,
    1 << 62,
    1 << 32,
    (1 << 32) + 1,
    u32::MAX as u64,
    (u32::MAX - 1) as u64,
    1 << 31,
    (1 << 31) - 1,
    u16::MAX as u64,
    1 << 40,
    1 << 48,
    100 * 1024 * 1024,
    100 * 1024 * 1024 + 1,
];

impl Num {
    /// The value, for an input of `len` bytes.
    pub fn resolve(self, len: usize) -> u64 {
        match self {
            Num::Extreme(i) => EXTREMES[i % EXTREMES.len()],
            Num::Small(v) => v as u64,
            Num::PastEnd(d) => (len as i64 + d as i64).max(0) as u64,
        }
    }
}

pub fn num() -> impl Strategy<Value = Num> {
    prop_oneof![
        3 => (0..EXTREMES.len()).prop_map(Num::Extreme),
        2 => prop_oneof![0u8..4, any::<u8>()].prop_map(Num::Small),
        2 => any::<i8>().prop_map(Num::PastEnd),
    ]
}

/// One byte-level edit.
#[derive(Clone, Debug)]
pub enum ByteOp {
    FlipBit {
        at: u32,
        bit: u8,
    },
    Set {
        at: u32,
        byte: u8,
    },
    Insert {
        at: u32,
        bytes: Vec<u8>,
    },
    Delete {
        at: u32,
        len: u16,
    },
    Truncate {
        at: u32,
    },
    /// Writes `value` little-endian in `width` bytes (1, 2, 4 or 8).
    PutInt {
        at: u32,
        width: u8,
        value: Num,
    },
    /// Copies `len` bytes from `from` to `at` (inserted, not overwritten).
    Splice {
        from: u32,
        len: u16,
        at: u32,
    },
}

pub fn byte_op() -> impl Strategy<Value = ByteOp> {
    let at = any::<u32>();
    prop_oneof![
        (at, 0u8..8).prop_map(|(at, bit)| ByteOp::FlipBit { at, bit }),
        (at, any::<u8>()).prop_map(|(at, byte)| ByteOp::Set { at, byte }),
        (at, vec(any::<u8>(), 1..16)).prop_map(|(at, bytes)| ByteOp::Insert { at, bytes }),
        (at, 1u16..64).prop_map(|(at, len)| ByteOp::Delete { at, len }),
        at.prop_map(|at| ByteOp::Truncate { at }),
        (at, prop_oneof![Just(1u8), Just(2), Just(4), Just(8)], num())
            .prop_map(|(at, width, value)| ByteOp::PutInt { at, width, value }),
        (at, 1u16..256, any::<u32>()).prop_map(|(from, len, at)| ByteOp::Splice { from, len, at }),
    ]
}

/// Up to `max` byte edits.
pub fn byte_ops(max: usize) -> impl Strategy<Value = Vec<ByteOp>> {
    vec(byte_op(), 0..=max)
}

/// `at` as a position in `0..=len`.
fn pos(at: u32, len: usize) -> usize {
    at as usize % (len + 1)
}

/// Writes `value` little-endian into `width` bytes at `at`, clipped at the end.
pub fn put_int(bytes: &mut [u8], at: usize, width: usize, value: u64) {
    for (i, b) in value.to_le_bytes().iter().take(width).enumerate() {
        if let Some(slot) = bytes.get_mut(at + i) {
            *slot = *b;
        }
    }
}

impl ByteOp {
    pub fn apply(&self, bytes: &mut Vec<u8>) {
        let len = bytes.len();
        match self {
            ByteOp::FlipBit { at, bit } if len > 0 => bytes[*at as usize % len] ^= 1 << (bit % 8),
            ByteOp::Set { at, byte } if len > 0 => bytes[*at as usize % len] = *byte,
            ByteOp::Insert { at, bytes: new } => {
                let at = pos(*at, len);
                bytes.splice(at..at, new.iter().copied());
            }
            ByteOp::Delete { at, len: n } => {
                let at = pos(*at, len);
                bytes.drain(at..(at + *n as usize).min(len));
            }
            ByteOp::Truncate { at } => bytes.truncate(pos(*at, len)),
            ByteOp::PutInt { at, width, value } => {
                put_int(bytes, pos(*at, len), *width as usize, value.resolve(len))
            }
            ByteOp::Splice { from, len: n, at } => {
                let from = pos(*from, len);
                let chunk = bytes[from..(from + *n as usize).min(len)].to_vec();
                let at = pos(*at, len);
                bytes.splice(at..at, chunk);
            }
            _ => {}
        }
    }
}

/// `seed` with `ops` applied in order.
pub fn apply_all(seed: &[u8], ops: &[ByteOp]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for op in ops {
        op.apply(&mut bytes);
    }
    bytes
}
