//! Pipeline files: which models to load, which passes to run, what to evaluate and what to
//! write, in RON.
//!
//! ```ron
//! Pipeline(
//!     device: "cpu",
//!     models: { "a": Hf("models/a"), "b": Hf("models/b") },
//!     passes: [ Merge(into: "merged", models: ["a", "b"], weights: [0.3, 0.7]) ],
//!     eval: [ Perplexity(model: "merged", text: "data/sample.txt") ],
//!     emit: [ Hf(model: "merged", dir: "out/merged") ],
//! )
//! ```
//!
//! Enums are externally tagged (`Hf("...")`, `Merge(...)`); optional fields may be written
//! bare (`weights: [..]`) or omitted. Relative paths are resolved against the directory of
//! the pipeline file; `~/` starts a path in the home directory. A malformed file is an
//! error with its line and column.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::emit::Emit;
use crate::Exec;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use upmix_backends::{Activations, DeviceSpec};
use upmix_frontend::TextTokenizer;
use upmix_ir::{Module, Runtime, RuntimeError, TrainingRuntime};
use upmix_passes::{
    DumpIr, PassContext, PassManager, PassSpec, Progress, PruneMethod, RouterInit, RuntimeProvider,
};

/// A whole pipeline file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Where models run for evaluation and for passes that execute them: `"cpu"`
    /// (default), `"wgpu"`, `"cuda:N"`.
    #[serde(default)]
    pub device: Option<String>,
    /// How activations meet quantized weights: `"float"` (default: f32 activations times
    /// the dequantized weights) or `"ggml"` (quantized per block first, as llama.cpp's
    /// CPU backend does, so results are llama.cpp's; cpu only).
    #[serde(default)]
    pub activations: Option<String>,
    /// Models to load, by the name passes refer to them with.
    pub models: BTreeMap<String, ModelSource>,
    /// Passes, run in the order written.
    #[serde(default)]
    pub passes: Vec<PassSpec>,
    /// Evaluations, run after all passes.
    #[serde(default)]
    pub eval: Vec<Eval>,
    /// Checkpoints to write, after evaluation.
    #[serde(default)]
    pub emit: Vec<Emit>,
}

/// Where a model comes from.
#[derive(Clone, Debug, Deserialize)]
pub enum ModelSource {
    /// A Hugging Face checkpoint directory (config.json + safetensors).
    Hf(PathBuf),
    /// A GGUF file (llama.cpp).
    Gguf(PathBuf),
}

/// An evaluation.
#[derive(Clone, Debug, Deserialize)]
pub enum Eval {
    /// Perplexity of `model` on the text file `text`, in windows of at most
    /// `window` tokens (default: the model's max positions, capped at 1024), each starting
    /// with BOS when `bos` (default: when the model's tokenizer adds one).
    Perplexity {
        model: String,
        text: PathBuf,
        #[serde(default)]
        window: Option<usize>,
        /// Start every window with BOS (default: when the tokenizer adds one).
        #[serde(default)]
        bos: Option<bool>,
    },
    /// Perplexity of each of `models` on each text of `texts` (a name per text, e.g. a
    /// domain), printed as one table; `window` and `bos` as for `Perplexity`.
    PerplexityTable {
        models: Vec<String>,
        texts: BTreeMap<String, PathBuf>,
        #[serde(default)]
        window: Option<usize>,
        #[serde(default)]
        bos: Option<bool>,
    },
    /// Divergent Token Metrics of `candidate` against `base` on the prompts of the text
    /// file `prompts` (one per line) over `max_new_tokens` (default 64) tokens.
    Divergence {
        base: String,
        candidate: String,
        prompts: PathBuf,
        #[serde(default)]
        max_new_tokens: Option<usize>,
    },
    /// Greedy continuation of `prompt` by `max_new_tokens` (default 20) tokens.
    Generate {
        model: String,
        prompt: String,
        #[serde(default)]
        max_new_tokens: Option<usize>,
    },
}

/// How to run a pipeline beyond what the file says.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Overrides the file's device.
    pub device: Option<DeviceSpec>,
    /// Overrides the file's activations.
    pub activations: Option<Activations>,
    pub dump_ir: DumpIr,
    /// Skip verification after each pass.
    pub no_verify: bool,
    /// Let every emit replace its destination even when it holds files upmix did not
    /// write (as `overwrite: true` on each emit).
    pub overwrite: bool,
    /// Continue every `Train` pass that has a `checkpoint` directory from its latest
    /// checkpoint (as `resume: true` on each).
    pub resume: bool,
    /// Set when the user asks to stop (Ctrl-C); long passes then stop at a safe point.
    pub stop: Option<&'static std::sync::atomic::AtomicBool>,
}

impl Pipeline {
    /// Parses pipeline text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Pipeline> {
        let options = ron::Options::default().with_default_extension(
            ron::extensions::Extensions::IMPLICIT_SOME
                | ron::extensions::Extensions::UNWRAP_VARIANT_NEWTYPES,
        );
        options.from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}:{}: {}",
                origin.display(),
                e.span.start.line,
                e.span.start.col,
                e.code
            )
        })
    }

    /// Reads and parses a pipeline file.
    pub fn read(path: &Path) -> Result<Pipeline> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading pipeline {}", path.display()))?;
        Pipeline::parse(&text, path)
    }
}

/// Builds runtimes on one device for passes that execute models, and tokenizes text for
/// them (each tokenizer file is loaded once, however many texts it encodes).
pub struct DeviceRuntimes {
    exec: Exec,
    tokenizers: HashMap<PathBuf, TextTokenizer>,
}

impl DeviceRuntimes {
    pub fn new(exec: impl Into<Exec>) -> Self {
        DeviceRuntimes {
            exec: exec.into(),
            tokenizers: HashMap::new(),
        }
    }

    fn encode(&mut self, m: &Module, graph: &str, text: &str) -> Result<Vec<u32>> {
        let path = tokenizer_path(m, graph)?;
        if !self.tokenizers.contains_key(path) {
            let tokenizer = TextTokenizer::load(path)?;
            self.tokenizers.insert(path.to_path_buf(), tokenizer);
        }
        Ok(self.tokenizers[path].encode(text, false)?)
    }
}

impl RuntimeProvider for DeviceRuntimes {
    fn runtime(&mut self, m: &Module, graph: &str) -> Result<Box<dyn Runtime>, RuntimeError> {
        self.exec.load(m, graph).map_err(RuntimeError::from)
    }

    fn tokenize(&mut self, m: &Module, graph: &str, text: &str) -> Result<Vec<u32>, RuntimeError> {
        self.encode(m, graph, text)
            .map_err(|e| RuntimeError::Backend(format!("{e:#}")))
    }

    fn training_runtime(
        &mut self,
        m: &Module,
        graph: &str,
    ) -> Result<Box<dyn TrainingRuntime>, RuntimeError> {
        Ok(upmix_backends::load_training_runtime(
            m,
            graph,
            &self.exec.device,
        )?)
    }
}

/// One progress bar per task on stderr (hidden when stderr is not a terminal).
#[derive(Default)]
struct ProgressBar {
    current: Option<(String, indicatif::ProgressBar)>,
}

impl ProgressBar {
    fn show(&mut self, p: Progress) {
        if self.current.as_ref().is_none_or(|(task, _)| task != p.task) {
            self.finish();
            let bar = indicatif::ProgressBar::new(p.total as u64).with_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} {msg} elapsed {elapsed} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(p.task.to_string());
            self.current = Some((p.task.to_string(), bar));
        }
        let (_, bar) = self.current.as_ref().expect("just set");
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(p.status.to_string());
    }

    fn finish(&mut self) {
        if let Some((_, bar)) = self.current.take() {
            bar.finish_and_clear();
        }
    }
}

/// Runs the pipeline file at `path`, returning the module and a report of what it did.
pub fn run_file(path: &Path, opts: &RunOptions) -> Result<(Module, String)> {
    let pipeline = Pipeline::read(path)?;
    let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
    run(&pipeline, &base, opts)
}

/// Runs `p`, resolving relative paths against `base`.
pub fn run(p: &Pipeline, base: &Path, opts: &RunOptions) -> Result<(Module, String)> {
    let resolve = |path: &Path| -> PathBuf {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        match (path.strip_prefix("~"), home) {
            (Ok(rest), Some(home)) => home.join(rest),
            _ if path.is_absolute() => path.to_path_buf(),
            _ => base.join(path),
        }
    };
    let device = match (&opts.device, &p.device) {
        (Some(d), _) => *d,
        (None, Some(s)) => s.parse::<DeviceSpec>()?,
        (None, None) => DeviceSpec::Cpu,
    };
    let activations = match (opts.activations, &p.activations) {
        (Some(a), _) => a,
        (None, Some(text)) => crate::parse_activations(text).map_err(anyhow::Error::msg)?,
        (None, None) => Activations::Float,
    };
    let exec = Exec {
        device,
        activations,
    };
    let mut out = String::new();
    let mut m = Module::new();
    for (name, source) in &p.models {
        let start = Instant::now();
        let (ModelSource::Hf(dir) | ModelSource::Gguf(dir)) = source;
        let dir = resolve(dir);
        upmix_frontend::load(&dir, name, &mut m)
            .with_context(|| format!("loading model `{name}`"))?;
        let g = m.graph(name).expect("just loaded");
        writeln!(
            out,
            "loaded {name:<12} {} ({} nodes, {} weights, {:.2} MB) in {:.2}s",
            dir.display(),
            g.node_count(),
            g.weight_ids().len(),
            m.graph_weight_bytes(name) as f64 / 1e6,
            start.elapsed().as_secs_f64()
        )?;
    }

    let mut manager = PassManager::new();
    manager.verify = !opts.no_verify;
    manager.dump_ir = opts.dump_ir.clone();
    for spec in &p.passes {
        let mut spec = spec.clone();
        let router = match &mut spec {
            PassSpec::Upcycle(u) => Some(&mut u.router),
            PassSpec::AttentionExperts(a) => Some(&mut a.router),
            PassSpec::Bam(b) => Some(&mut b.router),
            _ => None,
        };
        if let Some(
            RouterInit::DomainCentroid { texts, .. }
            | RouterInit::Nexus(upmix_passes::nexus::NexusRouter { texts, .. }),
        ) = router
        {
            texts.values_mut().for_each(|t| *t = resolve(t));
        }
        if let PassSpec::AddExpert(a) = &mut spec {
            a.text = resolve(&a.text);
        }
        let method = match &mut spec {
            PassSpec::Prune(p) => Some(&mut p.method),
            PassSpec::Train(t) => {
                t.data.values_mut().for_each(|f| *f = resolve(f));
                for files in t.eval.iter_mut() {
                    files.values_mut().for_each(|f| *f = resolve(f));
                }
                t.resume |= opts.resume && t.checkpoint.is_some();
                t.log = t.log.as_deref().map(&resolve);
                t.checkpoint = t.checkpoint.as_deref().map(&resolve);
                None
            }
            PassSpec::Plan(p) => {
                p.table = resolve(&p.table);
                p.fragment = p.fragment.as_deref().map(&resolve);
                Some(&mut p.method)
            }
            _ => None,
        };
        if let Some(PruneMethod::Wanda { calibration, .. }) = method {
            *calibration = resolve(calibration);
        }
        manager.add(spec.into_pass());
    }
    if opts.resume
        && !p
            .passes
            .iter()
            .any(|s| matches!(s, PassSpec::Train(t) if t.checkpoint.is_some()))
    {
        bail!("--resume: no Train pass of this pipeline has a `checkpoint` directory");
    }
    let mut provider = DeviceRuntimes::new(exec);
    let mut bar = ProgressBar::default();
    let mut cx = PassContext {
        runtimes: Some(&mut provider),
        notes: Vec::new(),
        progress: Some(&mut |p: Progress| bar.show(p)),
        stop: opts.stop,
    };
    let ran = manager.run(&mut m, &mut cx);
    let notes = std::mem::take(&mut cx.notes);
    drop(cx);
    bar.finish();
    // Loss curves, also of a run stopped part way.
    for spec in &p.passes {
        if let PassSpec::Train(t) = spec {
            let Some(log) = t.log.as_deref().map(&resolve).filter(|l| l.exists()) else {
                continue;
            };
            match crate::loss_curve::draw(&log) {
                Ok(svg) => writeln!(out, "wrote  loss curve {}", svg.display())?,
                // A pass's own error says more than a curve that could not be drawn.
                Err(e) if ran.is_ok() => return Err(e),
                Err(_) => {}
            }
        }
    }
    let reports = ran?;
    for r in &reports {
        writeln!(
            out,
            "pass   {:<12} -> {} ({:.2} MB of weights) in {:.3}s",
            r.pass,
            r.graphs.join(", "),
            r.weight_bytes as f64 / 1e6,
            r.seconds
        )?;
        for (graph, text) in &r.dumps {
            writeln!(out, "--- IR of `{graph}` after {} ---\n{text}", r.pass)?;
        }
    }
    for note in &notes {
        writeln!(out, "note: {note}")?;
    }

    for e in &p.eval {
        match e {
            Eval::Perplexity {
                model,
                text,
                window,
                bos,
            } => {
                let text_path = resolve(text);
                let content = std::fs::read_to_string(&text_path)
                    .with_context(|| format!("reading {}", text_path.display()))?;
                let opts = PerplexityOptions {
                    window: *window,
                    bos: *bos,
                };
                let (ppl, tokens) = perplexity(&m, model, &content, opts, &exec)?;
                writeln!(
                    out,
                    "eval   perplexity of {model} on {}: {ppl:.4} ({tokens} tokens)",
                    text_path.display()
                )?;
            }
            Eval::PerplexityTable {
                models,
                texts,
                window,
                bos,
            } => {
                let opts = PerplexityOptions {
                    window: *window,
                    bos: *bos,
                };
                let mut contents = Vec::new();
                for (name, path) in texts {
                    let path = resolve(path);
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    contents.push((name, text));
                }
                write!(out, "eval   perplexity  {:<10}", "model")?;
                for (name, _) in &contents {
                    write!(out, " {name:>10}")?;
                }
                writeln!(out)?;
                let texts: Vec<&str> = contents.iter().map(|(_, t)| t.as_str()).collect();
                for model in models {
                    write!(out, "eval   perplexity  {model:<10}")?;
                    for (ppl, _) in perplexities(&m, model, &texts, opts, &exec)? {
                        write!(out, " {ppl:>10.3}")?;
                    }
                    writeln!(out)?;
                }
            }
            Eval::Divergence {
                base,
                candidate,
                prompts,
                max_new_tokens,
            } => {
                let report = crate::dtm::divergence(
                    &m,
                    base,
                    candidate,
                    &resolve(prompts),
                    max_new_tokens.unwrap_or(64),
                    &exec,
                )?;
                write!(
                    out,
                    "eval   divergence of {candidate} from {base}: {}",
                    report.summary_line()
                )?;
            }
            Eval::Generate {
                model,
                prompt,
                max_new_tokens,
            } => {
                let text = generate(
                    &m,
                    model,
                    prompt,
                    max_new_tokens.unwrap_or(20),
                    false,
                    &exec,
                )?;
                writeln!(out, "eval   {model} continues {prompt:?}: {text:?}")?;
            }
        }
    }

    for e in &p.emit {
        let e = e.clone().resolved(&resolve);
        crate::emit::emit(&m, &e, opts.overwrite, &mut out)?;
    }
    Ok((m, out))
}

/// The tokenizer shipped with a model's checkpoint.
pub fn tokenizer_of(m: &Module, model: &str) -> Result<TextTokenizer> {
    Ok(TextTokenizer::load(tokenizer_path(m, model)?)?)
}

/// Where the tokenizer shipped with a model's checkpoint lies.
fn tokenizer_path<'m>(m: &'m Module, model: &str) -> Result<&'m Path> {
    let g = m
        .graph(model)
        .with_context(|| format!("no model named `{model}`"))?;
    match &g.meta.tokenizer {
        Some(path) => Ok(path),
        None => bail!("model `{model}` has no tokenizer"),
    }
}

/// How perplexity windows are cut.
#[derive(Clone, Copy, Debug, Default)]
pub struct PerplexityOptions {
    /// Window length in tokens, BOS included (default: the model's max positions, at most
    /// 1024).
    pub window: Option<usize>,
    /// Start every window with the BOS token (llama.cpp's practice); by default when the
    /// tokenizer adds one to a text it encodes (transformers' practice), else not.
    pub bos: Option<bool>,
}

/// Perplexity of `model` on `text`, in non-overlapping windows; returns (ppl, tokens).
pub fn perplexity(
    m: &Module,
    model: &str,
    text: &str,
    opts: PerplexityOptions,
    exec: &Exec,
) -> Result<(f64, usize)> {
    let mut one = perplexities(m, model, &[text], opts, exec)?;
    Ok(one.pop().expect("one text, one result"))
}

/// [`perplexity`] of `model` on each of `texts`, loading the model and tokenizer once.
///
/// Each window of `window` tokens is scored on its own; with a BOS, a window holds the BOS
/// and `window - 1` tokens of the text, every one of which is predicted.
pub fn perplexities(
    m: &Module,
    model: &str,
    texts: &[&str],
    opts: PerplexityOptions,
    exec: &Exec,
) -> Result<Vec<(f64, usize)>> {
    let tokenizer = tokenizer_of(m, model)?;
    let g = m
        .graph(model)
        .with_context(|| format!("no model named `{model}`"))?;
    let window = opts
        .window
        .unwrap_or(g.meta.max_position_embeddings.min(1024))
        .max(2);
    let adds_bos = {
        let with = tokenizer.encode("a", true)?;
        with.len() > tokenizer.encode("a", false)?.len()
            && with.first() == g.meta.bos_token_id.as_ref()
    };
    let bos = match (opts.bos.unwrap_or(adds_bos), g.meta.bos_token_id) {
        (false, _) => None,
        (true, Some(id)) => Some(id),
        (true, None) => bail!("model `{model}` has no BOS token to start windows with"),
    };
    let mut rt = exec.load(m, model)?;
    let mut out = Vec::with_capacity(texts.len());
    for text in texts {
        let ids = tokenizer.encode(text, false)?;
        let (mut nll, mut count) = (0.0, 0);
        let step = window - usize::from(bos.is_some());
        for chunk in ids.chunks(step) {
            let seq: Vec<u32> = bos.iter().copied().chain(chunk.iter().copied()).collect();
            if seq.len() < 2 {
                continue;
            }
            let ll = rt.log_likelihood(&seq)?;
            nll += ll.nll;
            count += ll.count;
        }
        if count == 0 {
            bail!("the text has fewer than two tokens");
        }
        out.push(((nll / count as f64).exp(), ids.len()));
    }
    Ok(out)
}

/// Greedy continuation of `prompt` as text; with `chat`, `prompt` is a user message
/// wrapped in the model's chat template and the reply is returned.
pub fn generate(
    m: &Module,
    model: &str,
    prompt: &str,
    max_new: usize,
    chat: bool,
    exec: &Exec,
) -> Result<String> {
    let tok = tokenizer_of(m, model)?;
    let ids = if chat {
        let text = tok.apply_chat_template(&[("user", prompt)], true)?;
        tok.encode(&text, false)?
    } else {
        tok.encode(prompt, true)?
    };
    let eos = m.graph(model).and_then(|g| g.meta.eos_token_id);
    let mut rt = exec.load(m, model)?;
    let mut new = rt.generate(&ids, max_new, eos)?;
    if new.last().is_some_and(|t| Some(*t) == eos) {
        new.pop();
    }
    Ok(tok.decode(&new)?)
}
