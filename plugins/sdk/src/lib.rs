//! The guest side of tuneforge plugins: write a plugin as a struct and one trait impl.
//!
//! Enable exactly one kind feature (`loss`, `metric`, `augment`, `cleaner`, `features`); it
//! selects the WIT world this crate generates bindings for (from the repository's `wit/`).
//! Then implement that kind's trait and export the type:
//!
//! ```ignore
//! use tuneforge_plugin_sdk::{Loss, LossBatch, LossOutput, PluginError, export_loss};
//!
//! struct Zero;
//! impl Loss for Zero {
//!     fn new() -> Result<Self, PluginError> { Ok(Zero) }
//!     fn compute(&mut self, batch: &LossBatch) -> Result<LossOutput, PluginError> {
//!         Ok(LossOutput { value: 0.0, grad: vec![0.0; batch.logits.len()] })
//!     }
//! }
//! export_loss!(Zero);
//! ```
//!
//! The struct is built once per instance by `new` (read [`config`] and [`asset`]s there)
//! and kept between calls. A panic becomes an error on the host that quotes its message.

#[cfg(any(
    all(feature = "loss", any(feature = "metric", feature = "augment", feature = "cleaner", feature = "features")),
    all(feature = "metric", any(feature = "augment", feature = "cleaner", feature = "features")),
    all(feature = "augment", any(feature = "cleaner", feature = "features")),
    all(feature = "cleaner", feature = "features"),
))]
compile_error!("enable exactly one kind feature of tuneforge-plugin-sdk (build plugins one at a time)");

#[cfg(not(any(feature = "loss", feature = "metric", feature = "augment", feature = "cleaner", feature = "features")))]
compile_error!("enable one kind feature of tuneforge-plugin-sdk: loss, metric, augment, cleaner or features");

#[cfg(feature = "loss")]
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub mod loss {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "loss",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "::tuneforge_plugin_sdk::loss",
    });
}
#[cfg(feature = "loss")]
use loss as world;

#[cfg(feature = "metric")]
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub mod metric {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "metric",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "::tuneforge_plugin_sdk::metric",
    });
}
#[cfg(feature = "metric")]
use metric as world;

#[cfg(feature = "augment")]
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub mod augment {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "augment",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "::tuneforge_plugin_sdk::augment",
    });
}
#[cfg(feature = "augment")]
use augment as world;

#[cfg(feature = "cleaner")]
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub mod cleaner {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "cleaner",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "::tuneforge_plugin_sdk::cleaner",
    });
}
#[cfg(feature = "cleaner")]
use cleaner as world;

#[cfg(feature = "features")]
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub mod features {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "features",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "::tuneforge_plugin_sdk::features",
    });
}
#[cfg(feature = "features")]
use features as world;

#[doc(hidden)]
pub use world::__export_world;
use world::tuneforge::plugin::host as raw;
pub use world::tuneforge::plugin::types::{Example, PluginError, Score};

#[cfg(feature = "loss")]
pub use loss::{LossBatch, LossOutput};
#[cfg(feature = "metric")]
pub use metric::Predictions;

impl PluginError {
    /// An error with a machine-readable `code` and a message for people.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self { code: code.into(), message: message.into() }
    }

    /// The plugin's configuration is wrong.
    pub fn bad_config(message: impl Into<String>) -> Self {
        Self::new("bad-config", message)
    }

    /// The input is not what the plugin can handle.
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self::new("bad-input", message)
    }
}

/// Log lines, tagged with the plugin's name on the host.
pub mod log {
    use super::raw;

    pub fn debug(message: &str) {
        raw::log(raw::LogLevel::Debug, message);
    }
    pub fn info(message: &str) {
        raw::log(raw::LogLevel::Info, message);
    }
    pub fn warn(message: &str) {
        raw::log(raw::LogLevel::Warn, message);
    }
    pub fn error(message: &str) {
        raw::log(raw::LogLevel::Error, message);
    }
}

/// The plugin's `[plugins.config]` table from the experiment file.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pairs: Vec<(String, String)>,
}

impl Config {
    /// A configuration from explicit pairs (for unit tests of a plugin).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Self { pairs: pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect() }
    }

    /// The raw text of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Keys other than `known`: report them, so typos do not pass silently.
    pub fn reject_unknown(&self, known: &[&str]) -> Result<(), PluginError> {
        match self.pairs.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            Some((k, _)) => Err(PluginError::bad_config(format!("unknown key `{k}` (known: {})", known.join(", ")))),
            None => Ok(()),
        }
    }

    /// A string, or `default`.
    pub fn string(&self, key: &str, default: &str) -> String {
        self.get(key).unwrap_or(default).to_string()
    }

    /// A number, or `default`; an unparsable value is an error naming the key.
    pub fn f64(&self, key: &str, default: f64) -> Result<f64, PluginError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| PluginError::bad_config(format!("`{key}` must be a number, got `{v}`"))),
        }
    }

    /// A non-negative integer, or `default`.
    pub fn usize(&self, key: &str, default: usize) -> Result<usize, PluginError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<usize>()
                .map_err(|_| PluginError::bad_config(format!("`{key}` must be a whole number >= 0, got `{v}`"))),
        }
    }

    /// A boolean, or `default`.
    pub fn bool(&self, key: &str, default: bool) -> Result<bool, PluginError> {
        match self.get(key).map(str::trim) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(v) => Err(PluginError::bad_config(format!("`{key}` must be true or false, got `{v}`"))),
        }
    }
}

/// The configuration the experiment gives this plugin.
pub fn config() -> Config {
    Config { pairs: raw::config() }
}

/// The task's label names, in the order of the logits' columns.
pub fn label_names() -> Vec<String> {
    raw::label_names()
}

/// The bytes of an asset the manifest declares and the experiment grants.
pub fn asset(name: &str) -> Result<Vec<u8>, PluginError> {
    raw::asset(name).map_err(|m| PluginError::new("asset", m))
}

/// An asset as UTF-8 text.
pub fn asset_text(name: &str) -> Result<String, PluginError> {
    String::from_utf8(asset(name)?).map_err(|_| PluginError::new("asset", format!("asset `{name}` is not UTF-8")))
}

/// A loss plugin: the value of a batch and its gradient with respect to the logits.
#[cfg(feature = "loss")]
pub trait Loss: Sized + 'static {
    /// Builds the plugin once per instance (read [`config`] and [`asset`]s here).
    fn new() -> Result<Self, PluginError>;
    /// `grad` must have `rows * classes` finite values, row-major.
    fn compute(&mut self, batch: &LossBatch) -> Result<LossOutput, PluginError>;
}

/// A metric plugin: scores on a model's validation predictions.
#[cfg(feature = "metric")]
pub trait Metric: Sized + 'static {
    fn new() -> Result<Self, PluginError>;
    fn evaluate(&mut self, predictions: &Predictions) -> Result<Vec<Score>, PluginError>;
}

/// An augmenter: new examples from one, deterministic for a seed.
#[cfg(feature = "augment")]
pub trait Augment: Sized + 'static {
    fn new() -> Result<Self, PluginError>;
    fn augment(&mut self, example: &Example, seed: u64) -> Result<Vec<Example>, PluginError>;
}

/// A cleaner: text in, text out.
#[cfg(feature = "cleaner")]
pub trait Cleaner: Sized + 'static {
    fn new() -> Result<Self, PluginError>;
    fn clean(&mut self, text: &str) -> Result<String, PluginError>;
}

/// A feature extractor: named numbers from a record (a JSON object with `text`).
#[cfg(feature = "features")]
pub trait Features: Sized + 'static {
    fn new() -> Result<Self, PluginError>;
    /// The feature names, in the order of `extract`'s values.
    fn describe(&self) -> Vec<String>;
    fn extract(&mut self, record_json: &str) -> Result<Vec<f32>, PluginError>;
}

#[doc(hidden)]
pub mod __private {
    use std::cell::RefCell;

    use crate::PluginError;

    /// Runs `f` on the instance's plugin, building it with `new` on first use.
    pub fn with<T, R>(
        slot: &'static std::thread::LocalKey<RefCell<Option<T>>>,
        new: fn() -> Result<T, PluginError>,
        f: impl FnOnce(&mut T) -> Result<R, PluginError>,
    ) -> Result<R, PluginError> {
        slot.with(|cell| {
            let mut guard = cell.borrow_mut();
            if guard.is_none() {
                *guard = Some(new()?);
            }
            match guard.as_mut() {
                Some(p) => f(p),
                None => Err(PluginError::new("internal", "plugin state missing")),
            }
        })
    }
}

#[doc(hidden)]
#[macro_export]
macro_rules! __state {
    ($t:ty) => {
        ::std::thread_local! {
            static __TUNEFORGE_PLUGIN: ::std::cell::RefCell<::std::option::Option<$t>> =
                const { ::std::cell::RefCell::new(None) };
        }
        struct __TuneforgeGuest;
    };
}

/// Exports a [`Loss`] implementation as the component's `loss` world.
#[cfg(feature = "loss")]
#[macro_export]
macro_rules! export_loss {
    ($t:ty) => {
        $crate::__state!($t);
        impl $crate::loss::Guest for __TuneforgeGuest {
            fn compute(batch: $crate::LossBatch) -> ::std::result::Result<$crate::LossOutput, $crate::PluginError> {
                $crate::__private::with(&__TUNEFORGE_PLUGIN, <$t as $crate::Loss>::new, |p| {
                    <$t as $crate::Loss>::compute(p, &batch)
                })
            }
        }
        $crate::__export_world!(__TuneforgeGuest);
    };
}

/// Exports a [`Metric`] implementation as the component's `metric` world.
#[cfg(feature = "metric")]
#[macro_export]
macro_rules! export_metric {
    ($t:ty) => {
        $crate::__state!($t);
        impl $crate::metric::Guest for __TuneforgeGuest {
            fn evaluate(
                predictions: $crate::Predictions,
            ) -> ::std::result::Result<::std::vec::Vec<$crate::Score>, $crate::PluginError> {
                $crate::__private::with(&__TUNEFORGE_PLUGIN, <$t as $crate::Metric>::new, |p| {
                    <$t as $crate::Metric>::evaluate(p, &predictions)
                })
            }
        }
        $crate::__export_world!(__TuneforgeGuest);
    };
}

/// Exports an [`Augment`] implementation as the component's `augment` world.
#[cfg(feature = "augment")]
#[macro_export]
macro_rules! export_augment {
    ($t:ty) => {
        $crate::__state!($t);
        impl $crate::augment::Guest for __TuneforgeGuest {
            fn augment(
                example: $crate::Example,
                seed: u64,
            ) -> ::std::result::Result<::std::vec::Vec<$crate::Example>, $crate::PluginError> {
                $crate::__private::with(&__TUNEFORGE_PLUGIN, <$t as $crate::Augment>::new, |p| {
                    <$t as $crate::Augment>::augment(p, &example, seed)
                })
            }
        }
        $crate::__export_world!(__TuneforgeGuest);
    };
}

/// Exports a [`Cleaner`] implementation as the component's `cleaner` world.
#[cfg(feature = "cleaner")]
#[macro_export]
macro_rules! export_cleaner {
    ($t:ty) => {
        $crate::__state!($t);
        impl $crate::cleaner::Guest for __TuneforgeGuest {
            fn clean(text: ::std::string::String) -> ::std::result::Result<::std::string::String, $crate::PluginError> {
                $crate::__private::with(&__TUNEFORGE_PLUGIN, <$t as $crate::Cleaner>::new, |p| {
                    <$t as $crate::Cleaner>::clean(p, &text)
                })
            }
        }
        $crate::__export_world!(__TuneforgeGuest);
    };
}

/// Exports a [`Features`] implementation as the component's `features` world.
#[cfg(feature = "features")]
#[macro_export]
macro_rules! export_features {
    ($t:ty) => {
        $crate::__state!($t);
        impl $crate::features::Guest for __TuneforgeGuest {
            fn describe() -> ::std::vec::Vec<::std::string::String> {
                match $crate::__private::with(&__TUNEFORGE_PLUGIN, <$t as $crate::Features>::new, |p| {
                    Ok(<$t as $crate::Features>::describe(p))
                }) {
                    Ok(names) => names,
                    Err(e) => panic!("cannot build the plugin: {e}"),
                }
            }
            fn extract(
                record_json: ::std::string::String,
            ) -> ::std::result::Result<::std::vec::Vec<f32>, $crate::PluginError> {
                $crate::__private::with(&__TUNEFORGE_PLUGIN, <$t as $crate::Features>::new, |p| {
                    <$t as $crate::Features>::extract(p, &record_json)
                })
            }
        }
        $crate::__export_world!(__TuneforgeGuest);
    };
}
