//! Running a model on text: perplexity in windows, greedy continuations, and the
//! tokenizer a checkpoint ships with. The pipeline's `eval` steps and the CLI's
//! `perplexity` and `generate` commands use these.

use std::path::Path;

use anyhow::{bail, Context, Result};
use upmix_frontend::TextTokenizer;
use upmix_ir::Module;

use crate::Exec;

/// The tokenizer shipped with a model's checkpoint.
pub fn tokenizer_of(m: &Module, model: &str) -> Result<TextTokenizer> {
    Ok(TextTokenizer::load(tokenizer_path(m, model)?)?)
}

/// Where the tokenizer shipped with a model's checkpoint lies.
pub(crate) fn tokenizer_path<'m>(m: &'m Module, model: &str) -> Result<&'m Path> {
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
