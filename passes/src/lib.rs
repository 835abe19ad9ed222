//! upmix-passes: rewrites over the IR.
//!
//! One pass per file, each a [`Pass`] whose module doc says what it computes, which paper
//! or tool it follows, and whether it preserves the model's function. Passes are declared
//! once in [`registry`]; the [`PassManager`] runs them in the order written and verifies
//! after each. Passes that must execute a model ask the [`PassContext`] for a runtime;
//! this crate never depends on a tensor backend.

pub mod adamw;
mod add_expert;
mod align;
mod attention_experts;
mod bam;
mod cast;
pub mod components;
mod compression_plan;
pub mod divergence;
mod hyperparams;
mod manager;
mod merge;
pub mod nexus;
mod non_finite;
mod parallel_attention;
mod pass;
mod prune;
mod quantize;
pub mod registry;
mod router_init;
pub mod sensitivity;
mod share_kv;
mod train;
mod train_checkpoint;
mod train_data;
mod train_log;
mod upcycle;

pub use adamw::{AdamW, AdamWConfig};
pub use add_expert::{AddExpert, NewRow};
pub use attention_experts::{AttentionExperts, AttentionRouting};
pub use bam::{Bam, KvSource};
pub use cast::Cast;
pub use compression_plan::{Assignment, Plan, PlanTarget};
pub use manager::{DumpIr, PassManager, PassReport};
pub use merge::Merge;
pub use parallel_attention::{KeptNorm, ParallelAttention};
pub use pass::{write_atomically, Pass, PassContext, PassError, Progress, RuntimeProvider};
pub use prune::{calibration_norms, ActivationNorms, Prune, PruneMethod, PruneTarget};
pub use quantize::{Quantize, QuantizeTarget};
pub use registry::{create, pass_names, PassInfo, PassSpec, REGISTRY};
pub use router_init::RouterInit;
pub use share_kv::ShareKv;
pub use train::{Schedule, Train};
pub use upcycle::Upcycle;
