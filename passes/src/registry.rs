//! The pass registry: every pass, declared once, with its pipeline spec.
//!
//! [`passes!`](crate::passes) is invoked once, in `lib.rs`, with one line per pass: the
//! file that holds it, its module and type, and a one-line description. From that line
//! it declares the module, gives the type its [`PassName`](crate::PassName), and adds it
//! to [`PassSpec`] (what a pipeline file's `passes: [...]` list deserialises into: an
//! externally tagged enum, the variant name being the pass name) and to [`REGISTRY`]
//! (what `upmix passes` lists). Adding a pass is its file and that one line.

use crate::pass::PassError;

/// A registry entry.
pub struct PassInfo {
    pub name: &'static str,
    pub doc: &'static str,
}

/// Declares the passes: `"folder/file.rs" module::Type => "what it does",` per pass.
macro_rules! passes {
    ($($file:literal $module:ident :: $ty:ident => $doc:literal,)+) => {
        $(
            #[path = $file]
            mod $module;
            pub use $module::$ty;
            impl $crate::PassName for $ty {
                fn name(&self) -> &'static str {
                    stringify!($ty)
                }
            }
        )+

        /// One pass as written in a pipeline file.
        #[derive(Clone, Debug, serde::Deserialize, PartialEq)]
        pub enum PassSpec {
            $($ty($ty),)+
        }

        impl PassSpec {
            /// The runnable pass.
            pub fn into_pass(self) -> Box<dyn $crate::Pass> {
                match self {
                    $(PassSpec::$ty(p) => Box::new(p),)+
                }
            }

            /// The pass, to inspect or adjust before it runs.
            pub fn as_pass_mut(&mut self) -> &mut dyn $crate::Pass {
                match self {
                    $(PassSpec::$ty(p) => p,)+
                }
            }

            /// The pass.
            pub fn as_pass(&self) -> &dyn $crate::Pass {
                match self {
                    $(PassSpec::$ty(p) => p,)+
                }
            }
        }

        /// Every pass upmix offers, in the order `upmix passes` lists them.
        pub const REGISTRY: &[$crate::registry::PassInfo] = &[
            $($crate::registry::PassInfo { name: stringify!($ty), doc: $doc },)+
        ];
    };
}

/// Names of all passes.
pub fn pass_names() -> Vec<String> {
    crate::REGISTRY.iter().map(|p| p.name.to_string()).collect()
}

/// Builds a pass from its name and its RON arguments (e.g. `("Cast", "(model: \"a\",
/// dtype: \"bf16\")")`); an unknown name is an error listing the valid names.
pub fn create(name: &str, ron_args: &str) -> Result<Box<dyn crate::Pass>, PassError> {
    if !crate::REGISTRY.iter().any(|p| p.name == name) {
        return Err(PassError::UnknownPass {
            name: name.to_string(),
            valid: pass_names(),
        });
    }
    let spec: crate::PassSpec = crate::settings::ron_options()
        .from_str(&format!("{name}{ron_args}"))
        .map_err(|e| PassError::Invalid {
            pass: name.to_string(),
            message: e.to_string(),
        })?;
    Ok(spec.into_pass())
}
