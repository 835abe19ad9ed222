//! Divergent Token Metrics from the command line and pipelines: prompts files, the cache
//! of base continuations, reports and sensitivity outputs.
//!
//! The metrics themselves live in `upmix_passes::divergence`; this module feeds them text.
//! Base continuations are cached under `$UPMIX_MODEL_CACHE` (default
//! `$XDG_CACHE_HOME/upmix`, else `~/.cache/upmix`) in `continuations/KEY.json`, `KEY`
//! hashing the base model's content (its graph, every weight's expression, the bytes of
//! every checkpoint file it reads), the prompts' token ids and the length.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use upmix_backends::Activations;

use crate::Exec;
use upmix_ir::{print_graph, Module, WeightExpr, WeightId};
use upmix_passes::divergence::{
    continuations, divergences, summarize, DivergenceSummary, PromptDivergence, DEFAULT_BATCH,
};

use crate::eval::tokenizer_of;

/// The prompts of a prompts file: one per line; blank lines are skipped.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading prompts {}", path.display()))?;
    let prompts: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    if prompts.is_empty() {
        bail!(
            "prompts file {} holds no prompts (one per line)",
            path.display()
        );
    }
    Ok(prompts)
}

/// Prompts as token ids under `model`'s tokenizer (with its special-token rule).
pub fn encode_prompts(m: &Module, model: &str, prompts: &[String]) -> Result<Vec<Vec<u32>>> {
    let tok = tokenizer_of(m, model)?;
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ids = tok.encode(p, true)?;
            if ids.is_empty() {
                bail!("prompt {} encodes to no tokens", i + 1);
            }
            Ok(ids)
        })
        .collect()
}

/// One candidate measured against a base.
#[derive(Clone, Debug)]
pub struct DivergenceReport {
    pub prompts: Vec<String>,
    pub prompt_ids: Vec<Vec<u32>>,
    pub continuations: Vec<Vec<u32>>,
    pub rows: Vec<PromptDivergence>,
    pub summary: DivergenceSummary,
    /// The base continuations came from the cache.
    pub cached: bool,
}

/// The base model's continuations of `prompt_ids`, from the cache when present; also
/// whether they came from it.
pub fn base_continuations(
    m: &Module,
    base: &str,
    prompt_ids: &[Vec<u32>],
    n: usize,
    exec: &Exec,
) -> Result<(Vec<Vec<u32>>, bool)> {
    base_continuations_in(&cache_dir(), m, base, prompt_ids, n, exec)
}

/// [`base_continuations`] with the cache under `cache`.
pub fn base_continuations_in(
    cache: &Path,
    m: &Module,
    base: &str,
    prompt_ids: &[Vec<u32>],
    n: usize,
    exec: &Exec,
) -> Result<(Vec<Vec<u32>>, bool)> {
    let mut key = cache_key(m, base, prompt_ids, n)?;
    if exec.activations == Activations::Ggml {
        key.push_str("-ggml");
    }
    let path = cache.join("continuations").join(format!("{key}.json"));
    if let Some(hit) = read_cached(&path, prompt_ids, n) {
        return Ok((hit, true));
    }
    let mut rt = exec.load(m, base)?;
    let ys = continuations(rt.as_mut(), prompt_ids, n, DEFAULT_BATCH)?;
    let entry = CachedContinuations {
        n,
        prompts: prompt_ids.to_vec(),
        continuations: ys.clone(),
    };
    // A cache that cannot be written costs only time.
    let _ = write_cached(&path, &entry);
    Ok((ys, false))
}

/// FDT/SDT of `candidate` against `base` on the prompts of `prompts_file`.
pub fn divergence(
    m: &Module,
    base: &str,
    candidate: &str,
    prompts_file: &Path,
    n: usize,
    exec: &Exec,
) -> Result<DivergenceReport> {
    if n == 0 {
        bail!("the continuation length must be at least 1 token");
    }
    let prompts = read_prompts(prompts_file)?;
    let prompt_ids = encode_prompts(m, base, &prompts)?;
    let (ys, cached) = base_continuations(m, base, &prompt_ids, n, exec)?;
    let mut rt = exec.load(m, candidate)?;
    let rows = divergences(rt.as_mut(), &prompt_ids, &ys, DEFAULT_BATCH)?;
    Ok(DivergenceReport {
        summary: summarize(&rows),
        prompts,
        prompt_ids,
        continuations: ys,
        rows,
        cached,
    })
}

impl DivergenceReport {
    /// A per-prompt table and the summary line, for people.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{:>4} {:>5} {:>7}  prompt", "#", "FDT", "SDT");
        for (i, (row, p)) in self.rows.iter().zip(&self.prompts).enumerate() {
            let shown: String = p.chars().take(60).collect();
            let _ = writeln!(s, "{:>4} {:>5} {:>7.4}  {shown}", i + 1, row.fdt, row.sdt);
        }
        s + &self.summary_line()
    }

    /// One line: the summaries.
    pub fn summary_line(&self) -> String {
        let t = &self.summary;
        format!(
            "{} prompts x {} tokens: FDT mean {:.2} median {:.1} p25 {:.2}, SDT mean {:.4}, perplexity of the base continuations {:.4}\n",
            t.prompts, t.n, t.mean_fdt, t.median_fdt, t.p25_fdt, t.mean_sdt, t.perplexity
        )
    }

    /// Per-prompt rows as JSON lines, for scripts.
    pub fn json_rows(&self) -> String {
        let mut s = String::new();
        for (i, row) in self.rows.iter().enumerate() {
            let line = serde_json::json!({
                "prompt": self.prompts[i],
                "prompt_ids": self.prompt_ids[i],
                "continuation": self.continuations[i],
                "fdt": row.fdt,
                "sdt": row.sdt,
                "divergent": row.divergent,
                "nll": row.nll,
            });
            let _ = writeln!(s, "{line}");
        }
        s
    }
}

#[derive(Serialize, Deserialize)]
struct CachedContinuations {
    n: usize,
    prompts: Vec<Vec<u32>>,
    continuations: Vec<Vec<u32>>,
}

fn read_cached(path: &Path, prompts: &[Vec<u32>], n: usize) -> Option<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path).ok()?;
    let c: CachedContinuations = serde_json::from_str(&text).ok()?;
    let fits = c.n == n
        && c.prompts == prompts
        && c.continuations.len() == prompts.len()
        && c.continuations.iter().all(|y| y.len() == n);
    fits.then_some(c.continuations)
}

fn write_cached(path: &Path, entry: &CachedContinuations) -> Result<()> {
    let dir = path.parent().expect("a cache file has a directory");
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    serde_json::to_writer(&mut tmp, entry)?;
    tmp.persist(path)?;
    Ok(())
}

/// The cache directory, by the rule scripts/fetch-models.sh uses.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("UPMIX_MODEL_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("upmix")
}

/// A hash of what `graph` computes on `prompts` for `n` tokens: its printed graph (under
/// any name), every weight's expression (literal values included) and the bytes of every
/// file it reads.
pub fn cache_key(m: &Module, graph: &str, prompts: &[Vec<u32>], n: usize) -> Result<String> {
    let g = m
        .graph(graph)
        .with_context(|| format!("no model named `{graph}`"))?;
    let mut h = Sha256::new();
    let mut unnamed = g.clone();
    unnamed.name.clear();
    h.update(print_graph(&unnamed, &m.weights).as_bytes());
    let mut files: HashMap<PathBuf, ()> = HashMap::new();
    let mut stack: Vec<WeightId> = g.weight_ids();
    let mut seen = std::collections::HashSet::new();
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        let w = m.weights.get(id)?;
        match &w.expr {
            WeightExpr::Source { file, .. } => {
                if files.insert(file.path().to_path_buf(), ()).is_none() {
                    h.update(Sha256::digest(file.bytes()));
                }
            }
            WeightExpr::Literal(t) => t.data.iter().for_each(|v| h.update(v.to_le_bytes())),
            other => h.update(format!("{other:?}").as_bytes()),
        }
        stack.extend(w.expr.operands());
    }
    h.update(format!("{n}:{prompts:?}").as_bytes());
    Ok(format!("{:x}", h.finalize()))
}
