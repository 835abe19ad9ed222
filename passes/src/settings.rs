//! Settings typed at load.
//!
//! Every pipeline field that is neither free text, a model name nor a path has a type here
//! (or in `upmix_ir`, like `DType`) whose `Deserialize` checks it, so a typo is an error
//! with the pipeline's `file:line:column` as soon as the file is read, before any model
//! loads: [`LayerRange`] (`"0..8"`), [`NofM`] (`"2:4"`), [`LearningRate`], [`Weights`]
//! (one per model), [`Scope`] (`"row"` or `"tensor"`), the types weights are stored in
//! ([`encodable`], [`float`]) and the component selectors of module `components`.
//!
//! Some checks need to know the models: a layer range past a model's last layer. Passes
//! make those in [`Pass::check`](crate::Pass::check) against the layer counts of
//! [`ModelLayers`], read from the checkpoints' headers before anything is loaded. Such an
//! error carries the [`Spot`] of the setting it is about; the pipeline reads its file
//! again with [`fail_at`] to turn the spot into a line and column.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use upmix_ir::DType;

/// The RON options of pipeline files and pass arguments: optional fields written bare,
/// newtype variants unwrapped.
pub fn ron_options() -> ron::Options {
    ron::Options::default().with_default_extension(
        ron::extensions::Extensions::IMPLICIT_SOME
            | ron::extensions::Extensions::UNWRAP_VARIANT_NEWTYPES,
    )
}

/// Where a setting stands in the text it was read from: the how-manieth setting that
/// carries a spot it is, counted while [`spotted`] reads. Settings made in code have
/// none. Spots are not part of a setting's value: any two compare equal.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spot(Option<u32>);

impl PartialEq for Spot {
    fn eq(&self, _: &Spot) -> bool {
        true
    }
}

/// The state of a read that counts spots.
struct Reading {
    next: u32,
    /// Fail at this spot with this message (a second read that locates an error).
    fail: Option<(u32, String)>,
}

thread_local! {
    static READING: RefCell<Option<Reading>> = const { RefCell::new(None) };
}

impl Spot {
    /// This spot, or `other` when this one is none.
    pub fn or(self, other: Spot) -> Spot {
        Spot(self.0.or(other.0))
    }

    /// The spot of the setting being deserialised now; called by the `Deserialize` of
    /// each setting that carries one. During [`fail_at`]'s read, the error to fail with.
    pub fn take<E: serde::de::Error>() -> Result<Spot, E> {
        READING.with(|r| {
            let mut r = r.borrow_mut();
            let Some(reading) = r.as_mut() else {
                return Ok(Spot(None));
            };
            let here = reading.next;
            reading.next += 1;
            match &reading.fail {
                Some((at, message)) if *at == here => Err(E::custom(message)),
                _ => Ok(Spot(Some(here))),
            }
        })
    }
}

/// Runs `read` (a deserialisation of pipeline text) counting spots.
pub fn spotted<T>(read: impl FnOnce() -> T) -> T {
    with_reading(
        Reading {
            next: 0,
            fail: None,
        },
        read,
    )
}

/// Runs `read` again, failing at `spot` with `message`: the error `read` then returns
/// carries the setting's position. `None` when the spot was not met (a setting made in
/// code).
pub fn fail_at<T, E>(read: impl FnOnce() -> Result<T, E>, spot: Spot, message: &str) -> Option<E> {
    let at = spot.0?;
    let reading = Reading {
        next: 0,
        fail: Some((at, message.to_string())),
    };
    with_reading(reading, read).err()
}

fn with_reading<T>(reading: Reading, read: impl FnOnce() -> T) -> T {
    let before = READING.with(|r| r.borrow_mut().replace(reading));
    let out = read();
    READING.with(|r| *r.borrow_mut() = before);
    out
}

/// A check of a setting that failed before anything ran.
#[derive(Clone, Debug, PartialEq)]
pub struct SettingError {
    /// Where the setting was written (none: the pass as a whole).
    pub spot: Spot,
    /// What is wrong, naming the field.
    pub message: String,
}

impl SettingError {
    /// An error about the pass as a whole, or a field without a spot of its own.
    pub fn new(message: String) -> Self {
        SettingError {
            spot: Spot::default(),
            message,
        }
    }
}

/// A value with the spot it was read at, e.g. a pass in a pipeline's list (its spot is
/// the end of its text).
#[derive(Clone, Debug, PartialEq)]
pub struct Spotted<T> {
    pub value: T,
    pub spot: Spot,
}

impl<T> From<T> for Spotted<T> {
    fn from(value: T) -> Self {
        Spotted {
            value,
            spot: Spot::default(),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Spotted<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = T::deserialize(d)?;
        Ok(Spotted {
            value,
            spot: Spot::take()?,
        })
    }
}

/// What is known of each model before any is loaded: its layer count, by name; passes
/// add the models they create ([`Pass::check`](crate::Pass::check)).
#[derive(Clone, Debug, Default)]
pub struct ModelLayers(BTreeMap<String, usize>);

impl ModelLayers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `model` has `layers` layers.
    pub fn insert(&mut self, model: &str, layers: usize) {
        self.0.insert(model.to_string(), layers);
    }

    /// The layer count of `model`, when known.
    pub fn get(&self, model: &str) -> Option<usize> {
        self.0.get(model).copied()
    }

    /// Records that `new` has the layers of `from` (a pass's output), when those are known.
    pub fn derive(&mut self, new: &str, from: &str) {
        if let Some(n) = self.get(from) {
            self.insert(new, n);
        }
    }

    /// Checks `range` (the field `layers`) against the layers of `model`, when known.
    pub fn check(&self, model: &str, range: Option<&LayerRange>) -> Result<(), SettingError> {
        match (range, self.get(model)) {
            (Some(r), Some(layers)) => r.check(model, layers).map_err(|message| SettingError {
                spot: r.spot,
                message,
            }),
            _ => Ok(()),
        }
    }
}

/// Layers `start..end` (start < end), written `"0..8"`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerRange {
    pub start: usize,
    pub end: usize,
    pub spot: Spot,
}

impl LayerRange {
    pub fn new(range: Range<usize>) -> Self {
        LayerRange {
            start: range.start,
            end: range.end,
            spot: Spot::default(),
        }
    }

    pub fn range(&self) -> Range<usize> {
        self.start..self.end
    }

    pub fn contains(&self, layer: usize) -> bool {
        self.range().contains(&layer)
    }

    /// An error unless the range lies within the `layers` layers of `model`.
    pub fn check(&self, model: &str, layers: usize) -> Result<(), String> {
        match self.end <= layers {
            true => Ok(()),
            false => Err(format!(
                "`{model}` has {layers} layers (0..{layers}): layer {} in layers {self} does not exist",
                self.end - 1
            )),
        }
    }
}

/// The indices of the `count` layers of `model` that `range` selects (all without one); an
/// error when the range reaches past them.
pub fn layer_indices(
    range: Option<&LayerRange>,
    count: usize,
    model: &str,
) -> Result<Vec<usize>, String> {
    match range {
        None => Ok((0..count).collect()),
        Some(r) => r.check(model, count).map(|()| r.range().collect()),
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

impl std::str::FromStr for LayerRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let parsed = text
            .split_once("..")
            .and_then(|(a, b)| Some(a.trim().parse().ok()?..b.trim().parse().ok()?));
        match parsed {
            Some(r) if r.start < r.end => Ok(LayerRange::new(r)),
            _ => Err(format!(
                "layers `{text}` is not a range like `0..8` (start < end)"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for LayerRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut range: LayerRange = from_text(d)?;
        range.spot = Spot::take()?;
        Ok(range)
    }
}

/// One weight per model, for averaging models (`[0.3, 0.7]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    pub values: Vec<f32>,
    pub spot: Spot,
}

impl From<Vec<f32>> for Weights {
    fn from(values: Vec<f32>) -> Self {
        Weights {
            values,
            spot: Spot::default(),
        }
    }
}

impl Weights {
    /// An error unless there is one finite weight per model of `models` and, when the sum
    /// divides (`normalize`), the weights do not sum to zero.
    pub fn check(&self, models: usize, normalize: bool) -> Result<(), String> {
        let sum: f32 = self.values.iter().sum();
        if self.values.len() != models {
            Err(format!(
                "{} weights given for {models} models",
                self.values.len()
            ))
        } else if self.values.iter().any(|w| !w.is_finite()) {
            Err(format!("weights {:?} are not all finite", self.values))
        } else if normalize && sum == 0.0 {
            Err(format!(
                "weights {:?} sum to zero, and the merge divides by their sum",
                self.values
            ))
        } else {
            Ok(())
        }
    }

    /// [`Weights::check`] as a setting error (the field `weights`).
    pub fn check_setting(&self, models: usize, normalize: bool) -> Result<(), SettingError> {
        self.check(models, normalize)
            .map_err(|message| SettingError {
                spot: self.spot,
                message,
            })
    }
}

impl<'de> Deserialize<'de> for Weights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let values = Vec::<f32>::deserialize(d)?;
        Ok(Weights {
            values,
            spot: Spot::take()?,
        })
    }
}

/// An N:M sparsity pattern (N of every M consecutive entries zeroed, N < M), written
/// `"2:4"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofM {
    pub n: usize,
    pub m: usize,
}

impl std::str::FromStr for NofM {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let parsed = text
            .split_once(':')
            .and_then(|(n, m)| Some((n.trim().parse().ok()?, m.trim().parse().ok()?)));
        match parsed {
            Some((n, m)) if n < m => Ok(NofM { n, m }),
            _ => Err(format!(
                "pattern `{text}` is not N:M with N < M, like `2:4`"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for NofM {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d)
    }
}

/// A learning rate: positive and finite.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LearningRate(f64);

impl LearningRate {
    pub fn new(lr: f64) -> Result<Self, String> {
        match lr.is_finite() && lr > 0.0 {
            true => Ok(LearningRate(lr)),
            false => Err(format!(
                "learning rate `lr: {lr}` must be positive and finite"
            )),
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for LearningRate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        LearningRate::new(f64::deserialize(d)?).map_err(D::Error::custom)
    }
}

/// Which entries compete when magnitude pruning picks what to zero: those of each output
/// row (`"row"`) or of the whole tensor (`"tensor"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    #[default]
    Row,
    Tensor,
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "row" => Ok(Scope::Row),
            "tensor" => Ok(Scope::Tensor),
            other => Err(format!("scope `{other}` is not `row` or `tensor`")),
        }
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d)
    }
}

/// Declares a pass that makes experts of several models (`Upcycle`, `AttentionExperts`,
/// `Bam`): the fields they share, then the pass's own. (RON reads no
/// `#[serde(flatten)]` from struct syntax, so the shared fields are declared here once
/// and written into each struct.) The pass's `check` calls [`check_experts`].
macro_rules! expert_pass {
    ($(#[$meta:meta])* pub struct $name:ident { $($fields:tt)* }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, serde::Deserialize, PartialEq)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// Name of the new model.
            pub into: String,
            /// The models that become the experts, in expert order.
            pub experts: Vec<String>,
            /// Router initialisation (default: `Random(seed: 0, std: 0.02)`); see
            /// [`RouterInit`](crate::RouterInit).
            #[serde(default)]
            pub router: $crate::RouterInit,
            /// Take every parameter that does not become an expert from this model
            /// instead of averaging the experts' models.
            #[serde(default)]
            pub base: Option<String>,
            /// Averaging weights, one per expert model (default: uniform).
            #[serde(default)]
            pub weights: Option<$crate::settings::Weights>,
            /// Layers that get experts, e.g. `"0..8"` (default: all).
            #[serde(default)]
            pub layers: Option<$crate::settings::LayerRange>,
            $($fields)*
        }
    };
}

/// The check of an [`expert_pass!`]: its weights against its experts, its layers against
/// the first expert's, and the new model recorded with them.
pub fn check_experts(
    models: &mut ModelLayers,
    into: &str,
    experts: &[String],
    (weights, layers): (Option<&Weights>, Option<&LayerRange>),
) -> Result<(), SettingError> {
    if let Some(w) = weights {
        w.check_setting(experts.len(), true)?;
    }
    if let Some(first) = experts.first() {
        models.check(first, layers)?;
        models.derive(into, first);
    }
    Ok(())
}

/// A type `Quantize` stores weights in: one upmix can encode.
pub fn encodable<'de, D: Deserializer<'de>>(d: D) -> Result<DType, D::Error> {
    dtype_where(
        d,
        DType::can_encode,
        "q8_0, q4_0, q4_1, int8_channel, f16, bf16, f32",
    )
}

/// [`encodable`], optional.
pub fn encodable_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DType>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|text| {
            parse_dtype(
                &text,
                DType::can_encode,
                "q8_0, q4_0, q4_1, int8_channel, f16, bf16, f32",
            )
        })
        .transpose()
        .map_err(D::Error::custom)
}

/// A float type `Cast` changes weights to.
pub fn float<'de, D: Deserializer<'de>>(d: D) -> Result<DType, D::Error> {
    dtype_where(
        d,
        |t| !t.is_quantized(),
        "f32, f16, bf16; quantized types with `Quantize`",
    )
}

fn dtype_where<'de, D: Deserializer<'de>>(
    d: D,
    ok: fn(DType) -> bool,
    valid: &str,
) -> Result<DType, D::Error> {
    let text = String::deserialize(d)?;
    parse_dtype(&text, ok, valid).map_err(D::Error::custom)
}

fn parse_dtype(text: &str, ok: fn(DType) -> bool, valid: &str) -> Result<DType, String> {
    DType::parse(text)
        .filter(|t| ok(*t))
        .ok_or_else(|| format!("unknown type `{text}` (valid: {valid})"))
}

/// A value written as a string and parsed by its `FromStr`, whose error becomes the
/// deserialiser's (so it carries the position).
pub fn from_text<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    let text = String::deserialize(d)?;
    text.parse().map_err(D::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)] // `a` is read only to be checked
    struct Two {
        a: LayerRange,
        b: LayerRange,
    }

    fn read(text: &str) -> Result<Two, ron::error::SpannedError> {
        ron_options().from_str(text)
    }

    #[test]
    fn a_spot_becomes_the_position_of_its_setting() {
        let text = "(\n  a: \"0..2\",\n  b: \"1..9\",\n)";
        let two = spotted(|| read(text)).unwrap();
        assert_eq!(two.b.range(), 1..9);
        let e = fail_at(|| read(text), two.b.spot, "too far").unwrap();
        assert_eq!(e.span.start.line, 3);
        assert!(e.to_string().contains("too far"), "{e}");
        // Outside a counted read, settings have no spot.
        let plain = read(text).unwrap();
        assert!(fail_at(|| read(text), plain.b.spot, "x").is_none());
    }

    #[test]
    fn bad_settings_are_errors_when_read() {
        let e = read("(a: \"3..1\", b: \"0..1\")").unwrap_err();
        assert!(e.to_string().contains("not a range"), "{e}");
        assert!("2:2".parse::<NofM>().is_err());
        assert_eq!("2:4".parse::<NofM>(), Ok(NofM { n: 2, m: 4 }));
        assert!(ron_options().from_str::<LearningRate>("-1.0").is_err());
        assert!(ron_options().from_str::<LearningRate>("inf").is_err());
        assert!(ron_options().from_str::<LearningRate>("1e-3").is_ok());
        assert!(ron_options().from_str::<Scope>("\"rows\"").is_err());
    }
}
