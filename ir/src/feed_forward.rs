//! The SwiGLU feed-forward block: a layer's FFN, each expert of a mixture, and the
//! projection of a Nexus router.

use crate::WeightId;

/// SwiGLU: `down(silu(gate x) * up x)`; `gate`, `up`: `[ffn, hidden]`, `down`: `[hidden, ffn]`.
#[derive(Clone, Debug, PartialEq)]
pub struct FeedForward {
    pub gate: WeightId,
    pub up: WeightId,
    pub down: WeightId,
}

impl FeedForward {
    pub(crate) fn map_weights(&mut self, f: &mut impl FnMut(WeightId) -> WeightId) {
        self.gate = f(self.gate);
        self.up = f(self.up);
        self.down = f(self.down);
    }

    pub(crate) fn push_weights(&self, prefix: &str, out: &mut Vec<(String, WeightId)>) {
        out.push((format!("{prefix}gate"), self.gate));
        out.push((format!("{prefix}up"), self.up));
        out.push((format!("{prefix}down"), self.down));
    }
}
