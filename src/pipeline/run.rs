//! Running a pipeline: load the models, run the passes, evaluate, emit.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use upmix_backends::{Activations, DeviceSpec};
use upmix_frontend::TextTokenizer;
use upmix_ir::{Module, Runtime, RuntimeError, TrainingRuntime};
use upmix_passes::{PassContext, PassManager, PassReport, PassSpec, Progress, RuntimeProvider};

use super::{resolve, Eval, Pipeline, RunOptions};
use crate::eval::{generate, perplexities, perplexity, tokenizer_path, PerplexityOptions};
use crate::Exec;

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
    p.check(base)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let resolve = |path: &Path| resolve(base, path);
    let exec = Exec {
        device: match opts.device.or(p.device) {
            Some(d) => d,
            None => DeviceSpec::Cpu,
        },
        activations: opts
            .activations
            .or(p.activations)
            .unwrap_or(Activations::Float),
    };
    let mut out = String::new();
    let mut m = load_models(p, &resolve, &mut out)?;
    run_passes(p, &resolve, opts, exec, &mut m, &mut out)?;
    for e in &p.eval {
        evaluate(&m, e, &resolve, &exec, &mut out)?;
    }
    for e in &p.emit {
        let e = e.value.clone().resolved(&resolve);
        crate::emit::emit(&m, &e, opts.overwrite, &mut out)?;
    }
    Ok((m, out))
}

/// Loads every model of `p`, reporting each.
fn load_models(
    p: &Pipeline,
    resolve: &dyn Fn(&Path) -> PathBuf,
    out: &mut String,
) -> Result<Module> {
    let mut m = Module::new();
    for (name, source) in &p.models {
        let start = Instant::now();
        let dir = resolve(source.path());
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
    Ok(m)
}

/// Runs the passes of `p` over `m` with a progress bar, then draws the loss curves of
/// `Train` passes (also of a run stopped part way) and reports each pass and the notes.
fn run_passes(
    p: &Pipeline,
    resolve: &dyn Fn(&Path) -> PathBuf,
    opts: &RunOptions,
    exec: Exec,
    m: &mut Module,
    out: &mut String,
) -> Result<()> {
    let mut manager = PassManager::new();
    manager.verify = !opts.no_verify;
    manager.dump_ir = opts.dump_ir.clone();
    let mut resumes = false;
    for spec in &p.passes {
        let mut spec = spec.value.clone();
        let pass = spec.as_pass_mut();
        pass.resolve_paths(resolve);
        resumes |= opts.resume && pass.resume();
        manager.add(spec.into_pass());
    }
    if opts.resume && !resumes {
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
    let ran = manager.run(m, &mut cx);
    let notes = std::mem::take(&mut cx.notes);
    drop(cx);
    bar.finish();
    for spec in &p.passes {
        let PassSpec::Train(t) = &spec.value else {
            continue;
        };
        let Some(log) = t.log.as_deref().map(resolve).filter(|l| l.exists()) else {
            continue;
        };
        match crate::loss_curve::draw(&log) {
            Ok(svg) => writeln!(out, "wrote  loss curve {}", svg.display())?,
            // A pass's own error says more than a curve that could not be drawn.
            Err(e) if ran.is_ok() => return Err(e),
            Err(_) => {}
        }
    }
    report(&ran?, &notes, out)
}

fn report(reports: &[PassReport], notes: &[String], out: &mut String) -> Result<()> {
    for r in reports {
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
    for note in notes {
        writeln!(out, "note: {note}")?;
    }
    Ok(())
}

/// Runs one evaluation and reports it.
fn evaluate(
    m: &Module,
    e: &Eval,
    resolve: &dyn Fn(&Path) -> PathBuf,
    exec: &Exec,
    out: &mut String,
) -> Result<()> {
    let read = |path: &Path| -> Result<(PathBuf, String)> {
        let path = resolve(path);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok((path, text))
    };
    match e {
        Eval::Perplexity {
            model,
            text,
            window,
            bos,
        } => {
            let (path, content) = read(text)?;
            let opts = PerplexityOptions {
                window: *window,
                bos: *bos,
            };
            let (ppl, tokens) = perplexity(m, model, &content, opts, exec)?;
            writeln!(
                out,
                "eval   perplexity of {model} on {}: {ppl:.4} ({tokens} tokens)",
                path.display()
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
                contents.push((name, read(path)?.1));
            }
            perplexity_table(m, models, &contents, opts, exec, out)?;
        }
        Eval::Divergence {
            base,
            candidate,
            prompts,
            max_new_tokens,
        } => {
            let report = crate::dtm::divergence(
                m,
                base,
                candidate,
                &resolve(prompts),
                max_new_tokens.unwrap_or(64),
                exec,
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
            let text = generate(m, model, prompt, max_new_tokens.unwrap_or(20), false, exec)?;
            writeln!(out, "eval   {model} continues {prompt:?}: {text:?}")?;
        }
    }
    Ok(())
}

/// The perplexity of each model on each named text, as a table.
fn perplexity_table(
    m: &Module,
    models: &[String],
    contents: &[(&String, String)],
    opts: PerplexityOptions,
    exec: &Exec,
    out: &mut String,
) -> Result<()> {
    write!(out, "eval   perplexity  {:<10}", "model")?;
    for (name, _) in contents {
        write!(out, " {name:>10}")?;
    }
    writeln!(out)?;
    let texts: Vec<&str> = contents.iter().map(|(_, t)| t.as_str()).collect();
    for model in models {
        write!(out, "eval   perplexity  {model:<10}")?;
        for (ppl, _) in perplexities(m, model, &texts, opts, exec)? {
            write!(out, " {ppl:>10.3}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}
