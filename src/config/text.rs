//! Values written as text (addresses, networks), parsed with an error that repeats the value.

use std::fmt::Display;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

fn parse<T: FromStr, E: serde::de::Error>(s: &str) -> Result<T, E>
where
    T::Err: Display,
{
    s.trim()
        .parse()
        .map_err(|e| E::custom(format!("invalid value {s:?}: {e}")))
}

pub fn one<'de, D: Deserializer<'de>, T: FromStr>(d: D) -> Result<T, D::Error>
where
    T::Err: Display,
{
    parse(&String::deserialize(d)?)
}

pub fn list<'de, D: Deserializer<'de>, T: FromStr>(d: D) -> Result<Vec<T>, D::Error>
where
    T::Err: Display,
{
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| parse(s))
        .collect()
}
