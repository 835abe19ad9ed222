//! upmix-ir: the model IR.
//!
//! A [`Module`] holds named [`Graph`]s of layer-level [`Op`]s over one lazy
//! [`WeightTable`]. Frontends build modules from checkpoints, passes rewrite them, backends
//! execute or emit them. This crate knows no file format's tensor names and no tensor
//! library: weights are lazy expressions materialised on demand as [`HostTensor`]s.
//!
//! Modules have a text form both ways: [`print_module`] writes it (and [`print_graph`] one
//! graph of it, for reading), [`parse_module`] reads it back, and [`structural_diff`] says
//! whether two modules are the same model (see the printer's module docs for the syntax).

mod builder;
mod codec;
mod dtype;
mod feed_forward;
mod finite;
mod graph;
mod module;
mod op;
mod parse;
mod print;
pub mod quant;
mod router;
mod runtime;
mod sparsity;
mod structural;
mod tensor;
mod verify;
mod weight_check;
mod weights;

pub use builder::{DecoderBlock, GraphBuilder, ParallelBlock};
pub use dtype::{DType, ParseDTypeError};
pub use feed_forward::FeedForward;
pub use finite::NonFinite;
pub use graph::{Edge, Graph, ModelMeta, Node, NodeId};
pub use module::Module;
pub use op::{
    Attention, MixtureOfAttention, MixtureOfExperts, Op, QkNorm, Rope, RopePairs, RopeScaling,
    Routing, SharedExpert,
};
pub use parse::{parse_module, ParseError};
pub use print::{print_graph, print_module};
pub use router::{swiglu_features, ProjectedRouter, Router};
pub use runtime::{
    LogLikelihood, LossGradients, RouterLosses, Runtime, RuntimeError, TokenScores, TrainingRuntime,
};
pub use sparsity::{ParsePatternError, Pattern, PruneRule};
pub use structural::structural_diff;
pub use tensor::HostTensor;
pub use verify::{verify, VerifyError, VerifyErrors};
pub use weights::{
    normal_samples, splitmix64, FileRange, MappedFile, Weight, WeightError, WeightExpr, WeightId,
    WeightTable,
};

/// The message of a caught panic (a `&str` or `String` payload), for turning a panic in a
/// library upmix calls into an error that says why.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
}
