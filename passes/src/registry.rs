//! The pass registry: every pass, declared once, with its pipeline spec.
//!
//! [`PassSpec`] is what a pipeline file's `passes: [...]` list deserialises into (an
//! externally tagged enum: the variant name is the pass name). [`REGISTRY`] lists the same
//! passes with a one-line description for `upmix passes` and for error messages.

use serde::Deserialize;

use crate::pass::{Pass, PassError};
use crate::{
    AddExpert, AttentionExperts, Bam, Cast, Merge, ParallelAttention, Plan, Prune, Quantize,
    ShareKv, Train, Upcycle,
};

/// One pass as written in a pipeline file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub enum PassSpec {
    Cast(Cast),
    Merge(Merge),
    Upcycle(Upcycle),
    AddExpert(AddExpert),
    AttentionExperts(AttentionExperts),
    ShareKv(ShareKv),
    ParallelAttention(ParallelAttention),
    Bam(Bam),
    Prune(Prune),
    Plan(Plan),
    Quantize(Quantize),
    Train(Train),
}

impl PassSpec {
    /// The runnable pass.
    pub fn into_pass(self) -> Box<dyn Pass> {
        match self {
            PassSpec::Cast(p) => Box::new(p),
            PassSpec::Merge(p) => Box::new(p),
            PassSpec::Upcycle(p) => Box::new(p),
            PassSpec::AddExpert(p) => Box::new(p),
            PassSpec::AttentionExperts(p) => Box::new(p),
            PassSpec::ShareKv(p) => Box::new(p),
            PassSpec::ParallelAttention(p) => Box::new(p),
            PassSpec::Bam(p) => Box::new(p),
            PassSpec::Prune(p) => Box::new(p),
            PassSpec::Plan(p) => Box::new(p),
            PassSpec::Quantize(p) => Box::new(p),
            PassSpec::Train(p) => Box::new(p),
        }
    }
}

/// A registry entry.
pub struct PassInfo {
    pub name: &'static str,
    pub doc: &'static str,
}

/// Every pass upmix offers, in the order `upmix passes` lists them.
pub const REGISTRY: &[PassInfo] = &[
    PassInfo {
        name: "Cast",
        doc: "change a model's weight dtype (f32, f16, bf16)",
    },
    PassInfo {
        name: "Merge",
        doc: "weighted average of same-architecture models into a new model (mergekit linear)",
    },
    PassInfo {
        name: "Upcycle",
        doc: "dense models into a mixture of experts: each model's FFN becomes an expert (BTX / sparse upcycling)",
    },
    PassInfo {
        name: "AddExpert",
        doc: "one more expert for a mixture of experts, from a dense model trained on a new domain (Nexus)",
    },
    PassInfo {
        name: "AttentionExperts",
        doc: "models' attention into a routed mixture of attention experts per layer (BAM), soft or top-k",
    },
    PassInfo {
        name: "ShareKv",
        doc: "attention experts share one key/value projection and KV cache (mean, or a named model's)",
    },
    PassInfo {
        name: "ParallelAttention",
        doc: "sequential blocks into parallel ones (one norm feeds attention and FFN); changes the function",
    },
    PassInfo {
        name: "Bam",
        doc: "Branch-Attend-Mix: FFN experts and attention experts from dense branches, expert or shared KV, optionally parallel",
    },
    PassInfo {
        name: "Prune",
        doc: "zero the lowest-scoring weights of selected projections: magnitude or Wanda, per row, per tensor or N:M (2:4)",
    },
    PassInfo {
        name: "Plan",
        doc: "per-component pruning levels from a sensitivity table by a threshold sweep on FDT (Divergent Token Metrics)",
    },
    PassInfo {
        name: "Quantize",
        doc: "store selected weights as q8_0, q4_0, q4_1 (ggml blocks), int8 per channel, f16 or bf16",
    },
    PassInfo {
        name: "Train",
        doc: "train selected weights on text with AdamW (cross-entropy, router load balancing and z-loss)",
    },
];

/// Names of all passes.
pub fn pass_names() -> Vec<String> {
    REGISTRY.iter().map(|p| p.name.to_string()).collect()
}

/// Builds a pass from its name and its RON arguments (e.g. `("Cast", "(model: \"a\",
/// dtype: \"bf16\")")`); an unknown name is an error listing the valid names.
pub fn create(name: &str, ron_args: &str) -> Result<Box<dyn Pass>, PassError> {
    if !REGISTRY.iter().any(|p| p.name == name) {
        return Err(PassError::UnknownPass {
            name: name.to_string(),
            valid: pass_names(),
        });
    }
    let options = ron::Options::default().with_default_extension(
        ron::extensions::Extensions::IMPLICIT_SOME
            | ron::extensions::Extensions::UNWRAP_VARIANT_NEWTYPES,
    );
    let spec: PassSpec = options
        .from_str(&format!("{name}{ron_args}"))
        .map_err(|e| PassError::Invalid {
            pass: name.to_string(),
            message: e.to_string(),
        })?;
    Ok(spec.into_pass())
}
