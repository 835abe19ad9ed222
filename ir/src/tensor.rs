//! A plain host tensor: the currency between the weight table, runtimes and emitters.

/// A dense row-major f32 tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Wraps `data` with `shape`; panics if the element count differs (a programming error).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "HostTensor shape {shape:?} does not match {} elements",
            data.len()
        );
        HostTensor { shape, data }
    }

    /// Wraps `data` with `shape`, or `None` if the element count differs (for data whose
    /// size comes from outside, e.g. a runtime or a file).
    pub fn try_new(shape: Vec<usize>, data: Vec<f32>) -> Option<Self> {
        (shape.iter().product::<usize>() == data.len()).then_some(HostTensor { shape, data })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Row `i` of a 2-D tensor.
    pub fn row(&self, i: usize) -> &[f32] {
        let cols = *self.shape.last().unwrap_or(&1);
        &self.data[i * cols..(i + 1) * cols]
    }

    /// Largest absolute element-wise difference to `other` (infinite if shapes differ).
    pub fn max_abs_diff(&self, other: &HostTensor) -> f32 {
        if self.shape != other.shape {
            return f32::INFINITY;
        }
        self.data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }
}
