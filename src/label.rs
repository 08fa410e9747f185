//! Names of fixed sets, written once on the enum: the value a config key takes
//! ([`Choice`]) and the value a metric label or log field carries ([`Label::as_label`]).
//! Each such enum derives strum's `IntoStaticStr` (its name), and for config values also
//! `EnumString` (the parse) and `VariantNames` (the list an error message shows).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use strum::VariantNames;

/// The written name of an enum value, for metric labels, log fields and config files.
pub trait Label: Copy + Into<&'static str> {
    fn as_label(self) -> &'static str {
        self.into()
    }
}

impl<T: Copy + Into<&'static str>> Label for T {}

/// A config value that must be one of `T`'s names. Parsing never fails on an unknown name:
/// the file still deserializes, and validation reports the bad value with every other
/// problem in the file (`sluice check-config` lists them all at once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice<T> {
    Known(T),
    Unknown(String),
}

impl<T> From<T> for Choice<T> {
    fn from(value: T) -> Self {
        Self::Known(value)
    }
}

impl<T: Label + VariantNames> Choice<T> {
    /// The value, or the message for the config error: what was written, and what may be.
    pub fn get(&self) -> Result<T, String> {
        match self {
            Self::Known(v) => Ok(*v),
            Self::Unknown(s) => Err(format!("{s:?} is not one of {}", T::VARIANTS.join(", "))),
        }
    }
}

impl<'de, T: FromStr> Deserialize<'de> for Choice<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.parse() {
            Ok(v) => Self::Known(v),
            Err(_) => Self::Unknown(s),
        })
    }
}

impl<T: Label> Serialize for Choice<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Known(v) => s.serialize_str(v.as_label()),
            Self::Unknown(raw) => s.serialize_str(raw),
        }
    }
}

impl<T: Label> fmt::Display for Choice<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Known(v) => f.write_str(v.as_label()),
            Self::Unknown(raw) => f.write_str(raw),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(
        Debug,
        Clone,
        Copy,
        PartialEq,
        Eq,
        strum::EnumString,
        strum::IntoStaticStr,
        strum::VariantNames,
    )]
    #[strum(serialize_all = "snake_case")]
    enum Colour {
        DeepRed,
        #[strum(serialize = "blue2")]
        Blue,
    }

    #[derive(Debug, Deserialize, Serialize)]
    struct File {
        colour: Choice<Colour>,
    }

    #[test]
    fn known_and_unknown_names() {
        let cases = [
            ("deep_red", Ok(Colour::DeepRed)),
            ("blue2", Ok(Colour::Blue)),
            (
                "Blue",
                Err("\"Blue\" is not one of deep_red, blue2".to_string()),
            ),
            ("", Err("\"\" is not one of deep_red, blue2".to_string())),
        ];
        for (written, want) in cases {
            let f: File = toml::from_str(&format!("colour = {written:?}")).unwrap();
            assert_eq!(f.colour.get(), want, "{written:?}");
            // Written back as it was, known or not (the admin API shows definitions).
            assert_eq!(
                toml::to_string(&f).unwrap().trim(),
                format!("colour = {written:?}")
            );
        }
    }

    #[test]
    fn a_non_string_is_still_a_parse_error() {
        assert!(toml::from_str::<File>("colour = 3").is_err());
    }

    #[test]
    fn labels_are_the_written_names() {
        assert_eq!(Colour::DeepRed.as_label(), "deep_red");
        assert_eq!(Colour::Blue.as_label(), "blue2");
    }
}
