//! The pass manager: runs passes in the order given, verifies after each, and reports
//! time, weight bytes and (on request) the IR text after each pass. It also checks for
//! NaN and Inf values (see [`crate::non_finite`]): notes for those a pass reads from
//! checkpoints, an error for those a pass computes.

use std::time::Instant;

use upmix_ir::{print_graph, verify, Module};

use crate::non_finite::{check_created, NonFiniteChecks};
use crate::pass::{Pass, PassContext, PassError};

/// When to print the IR.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum DumpIr {
    #[default]
    Never,
    /// After every pass.
    All,
    /// After the passes with these names.
    After(Vec<String>),
}

/// What one pass did.
#[derive(Clone, Debug)]
pub struct PassReport {
    pub pass: String,
    pub seconds: f64,
    /// Graphs the pass created or changed.
    pub graphs: Vec<String>,
    /// Stored bytes of those graphs' weights after the pass.
    pub weight_bytes: usize,
    /// `(graph, IR text)` of the changed graphs, when dumping was asked for.
    pub dumps: Vec<(String, String)>,
}

/// Runs a list of passes.
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
    /// Verify every changed graph after each pass (on by default).
    pub verify: bool,
    pub dump_ir: DumpIr,
    /// Check the values passes read and compute for NaN and Inf (on by default).
    pub check_non_finite: bool,
}

impl Default for PassManager {
    fn default() -> Self {
        Self::new()
    }
}

impl PassManager {
    pub fn new() -> Self {
        PassManager {
            passes: Vec::new(),
            verify: true,
            dump_ir: DumpIr::Never,
            check_non_finite: true,
        }
    }

    pub fn add(&mut self, pass: Box<dyn Pass>) -> &mut Self {
        self.passes.push(pass);
        self
    }

    /// Runs every pass in order; stops at the first error.
    pub fn run(&self, m: &mut Module, cx: &mut PassContext) -> Result<Vec<PassReport>, PassError> {
        let mut reports = Vec::with_capacity(self.passes.len());
        let mut checks = NonFiniteChecks::default();
        for pass in &self.passes {
            if self.check_non_finite {
                let notes = checks.scan_inputs(m, pass.as_ref())?;
                cx.notes.extend(notes);
            }
            let start = Instant::now();
            let first_new = m.weights.len();
            let graphs = pass.run(m, cx)?;
            let seconds = start.elapsed().as_secs_f64();
            if self.check_non_finite {
                check_created(m, pass.name(), first_new)?;
            }
            for name in &graphs {
                if let (true, Some(g)) = (self.verify, m.graph(name)) {
                    verify(g, &m.weights).map_err(|errors| PassError::Verify {
                        pass: pass.name().to_string(),
                        errors,
                    })?;
                }
            }
            let dump = match &self.dump_ir {
                DumpIr::Never => false,
                DumpIr::All => true,
                DumpIr::After(names) => names.iter().any(|n| n == pass.name()),
            };
            let dumps = if dump {
                graphs
                    .iter()
                    .filter_map(|n| m.graph(n).map(|g| (n.clone(), print_graph(g, &m.weights))))
                    .collect()
            } else {
                Vec::new()
            };
            reports.push(PassReport {
                pass: pass.name().to_string(),
                seconds,
                weight_bytes: graphs.iter().map(|g| m.graph_weight_bytes(g)).sum(),
                graphs,
                dumps,
            });
        }
        Ok(reports)
    }
}
