//! `Cast`: change the storage dtype of a model's weights (f32, f16, bf16).
//!
//! Values are rounded to nearest-even in the new dtype when materialised; emitters write
//! the new dtype. Function-preserving only up to that rounding (exact when widening, e.g.
//! bf16 -> f32). Other graphs that share the weights are not affected: the cast graph gets
//! its own weight entries.

use std::collections::HashMap;

use serde::Deserialize;
use upmix_ir::{DType, Module};

use crate::pass::{graph, weight_err, Pass, PassContext, PassError, PassName};

/// Pipeline spec: `Cast(model: "moe", dtype: "bf16")`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cast {
    /// The model to cast (in place).
    pub model: String,
    /// Target dtype: `"f32"`, `"f16"` or `"bf16"`.
    #[serde(deserialize_with = "crate::settings::float")]
    pub dtype: DType,
}

impl Pass for Cast {
    fn run(&self, m: &mut Module, _cx: &mut PassContext) -> Result<Vec<String>, PassError> {
        let dtype = self.dtype;
        if dtype.is_quantized() {
            return Err(self.invalid(format!(
                "`{dtype}` is quantized: Cast changes weights to f32, f16 or bf16 (quantized types with `Quantize`)"
            )));
        }
        let g = graph(m, self.name(), &self.model)?;
        let mut remap = HashMap::new();
        for id in g.weight_ids() {
            let mut w = m.weights.get(id).map_err(weight_err(self.name()))?.clone();
            if w.dtype != dtype {
                w.dtype = dtype;
                let new = m.weights.add(w).map_err(weight_err(self.name()))?;
                remap.insert(id, new);
            }
        }
        let g = m.graph_mut(&self.model).expect("checked above");
        for n in g.node_ids() {
            g.node_mut(n)
                .op
                .map_weights(|id| *remap.get(&id).unwrap_or(&id));
        }
        Ok(vec![self.model.clone()])
    }

    fn reads(&self) -> Vec<String> {
        vec![self.model.clone()]
    }
}
