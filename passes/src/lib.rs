//! upmix-passes: rewrites over the IR.
//!
//! One pass per file, each a [`Pass`] whose module doc says what it computes, which paper
//! or tool it follows, and whether it preserves the model's function. Passes are declared
//! once in [`registry`]; the [`PassManager`] runs them in the order written and verifies
//! after each. Passes that must execute a model ask the [`PassContext`] for a runtime;
//! this crate never depends on a tensor backend.

// Modules other than passes, by folder. Passes are declared by `passes!` below.
#[macro_use]
pub mod registry;
#[macro_use]
pub mod settings;
#[path = "train/adamw.rs"]
pub mod adamw;
#[path = "combine/align.rs"]
mod align;
#[path = "analysis/components.rs"]
pub mod components;
#[path = "analysis/divergence.rs"]
pub mod divergence;
#[path = "moe/hidden_states.rs"]
mod hidden_states;
#[path = "combine/hyperparams.rs"]
mod hyperparams;
mod manager;
#[path = "moe/nexus_router.rs"]
pub mod nexus_router;
mod non_finite;
mod pass;
#[path = "moe/router_init.rs"]
mod router_init;
#[path = "analysis/sensitivity.rs"]
pub mod sensitivity;
#[path = "train/train_checkpoint.rs"]
mod train_checkpoint;
#[path = "train/train_data.rs"]
mod train_data;
#[path = "train/train_log.rs"]
mod train_log;
#[path = "train/train_run.rs"]
mod train_run;

passes! {
    "compress/cast.rs" cast::Cast => "change a model's weight dtype (f32, f16, bf16)",
    "combine/merge.rs" merge::Merge => "weighted average of same-architecture models into a new model (mergekit linear)",
    "moe/upcycle.rs" upcycle::Upcycle => "dense models into a mixture of experts: each model's FFN becomes an expert (BTX / sparse upcycling)",
    "moe/add_expert.rs" add_expert::AddExpert => "one more expert for a mixture of experts, from a dense model trained on a new domain (Nexus)",
    "attention/attention_experts.rs" attention_experts::AttentionExperts => "models' attention into a routed mixture of attention experts per layer (BAM), soft or top-k",
    "attention/share_kv.rs" share_kv::ShareKv => "attention experts share one key/value projection and KV cache (mean, or a named model's)",
    "attention/parallel_attention.rs" parallel_attention::ParallelAttention => "sequential blocks into parallel ones (one norm feeds attention and FFN); changes the function",
    "attention/bam.rs" bam::Bam => "Branch-Attend-Mix: FFN experts and attention experts from dense branches, expert or shared KV, optionally parallel",
    "compress/prune.rs" prune::Prune => "zero the lowest-scoring weights of selected projections: magnitude or Wanda, per row, per tensor or N:M (2:4)",
    "compress/plan.rs" plan::Plan => "per-component pruning levels from a sensitivity table by a threshold sweep on FDT (Divergent Token Metrics)",
    "compress/quantize.rs" quantize::Quantize => "store selected weights as q8_0, q4_0, q4_1 (ggml blocks), int8 per channel, f16 or bf16",
    "train/train.rs" train::Train => "train selected weights on text with AdamW (cross-entropy, router load balancing and z-loss)",
}

pub use adamw::{AdamW, AdamWConfig};
pub use add_expert::NewRow;
pub use attention_experts::AttentionRouting;
pub use bam::KvSource;
pub use manager::{DumpIr, PassManager, PassReport};
pub use parallel_attention::KeptNorm;
pub use pass::{
    write_atomically, Pass, PassContext, PassError, PassName, Progress, RuntimeProvider,
};
pub use plan::{Assignment, PlanTarget, Statistic};
pub use prune::{calibration_norms, ActivationNorms, PruneMethod, PruneTarget};
pub use quantize::QuantizeTarget;
pub use registry::{create, pass_names, PassInfo};
pub use router_init::RouterInit;
pub use train::Schedule;
