//! Loading: the YAML file and `PUSHRELAY_` environment merged by figment, `HTTPS_PROXY` /
//! `NO_PROXY`, and where each value came from (file or environment variable) for every problem.

use std::fmt;
use std::path::Path;

use figment::providers::{Env, Format};
use figment::{Figment, Metadata};

use super::shape::Config;
use super::validate::{ValidConfig, validate};
use super::values::ProxyUrl;
use crate::policy::Authority;

pub(super) const ENV_PREFIX: &str = "PUSHRELAY_";

/// The YAML format for figment, over serde-saphyr (safe Rust, with limits against YAML bombs).
pub(super) struct Yaml;

impl Format for Yaml {
    type Error = serde_saphyr::Error;
    const NAME: &'static str = "YAML";

    fn from_str<T: serde::de::DeserializeOwned>(string: &str) -> Result<T, Self::Error> {
        serde_saphyr::from_str(string)
    }
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
    pub origin: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (from {})", self.key, self.message, self.origin)
    }
}

#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration")?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// A validated configuration and the warnings to log at start-up.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: ValidConfig,
    pub warnings: Vec<String>,
    /// Where the configuration came from, for the start-up log line.
    pub origin: String,
}

/// Environment variables that feed the configuration besides `PUSHRELAY_*`.
#[derive(Debug, Clone, Default)]
pub struct ProxyEnv {
    pub https_proxy: Option<(String, String)>,
    pub no_proxy: Option<String>,
}

impl ProxyEnv {
    pub fn from_process() -> Self {
        let pick = |names: &[&str]| {
            names.iter().find_map(|n| {
                std::env::var(n)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .map(|v| (n.to_string(), v))
            })
        };
        ProxyEnv {
            https_proxy: pick(&["HTTPS_PROXY", "https_proxy"]),
            no_proxy: pick(&["NO_PROXY", "no_proxy"]).map(|(_, v)| v),
        }
    }
}

/// Loads `file` (when given; it must exist) and the process environment.
pub fn load(file: Option<&Path>) -> Result<Loaded, ConfigError> {
    let mut figment = Figment::new();
    let origin = match file {
        Some(path) => {
            if let Err(e) = std::fs::metadata(path) {
                return Err(ConfigError {
                    problems: vec![Problem {
                        key: "--config".into(),
                        message: format!("cannot read {}: {e}", path.display()),
                        origin: "command line".into(),
                    }],
                });
            }
            figment = figment.merge(Yaml::file_exact(path));
            format!("{} and {ENV_PREFIX}* environment", path.display())
        }
        None => format!("built-in defaults and {ENV_PREFIX}* environment"),
    };
    figment = figment.merge(
        Env::prefixed(ENV_PREFIX)
            .split("__")
            .filter(|key| key.as_str() != "config"),
    );
    extract(figment, &ProxyEnv::from_process(), origin)
}

/// The `destinations` of `file` alone (the built-in ones when it names none), nothing else read
/// or checked: `ca init --config` needs them before the CA the file names exists.
pub fn destinations_in(file: &Path) -> Result<Vec<Authority>, ConfigError> {
    #[derive(serde::Deserialize)]
    struct Only {
        destinations: Option<Vec<Authority>>,
    }
    let only: Only = Figment::new()
        .merge(Yaml::file_exact(file))
        .extract()
        .map_err(|e| ConfigError {
            problems: e.into_iter().map(problem_from_figment).collect(),
        })?;
    Ok(only
        .destinations
        .unwrap_or_else(|| Config::default().destinations))
}

/// Parses YAML text alone, without the environment: for tests and embedded use.
pub fn from_yaml(text: &str) -> Result<Loaded, ConfigError> {
    let figment = Figment::new().merge(Yaml::string(text));
    extract(figment, &ProxyEnv::default(), "YAML text".into())
}

pub(super) fn extract(
    figment: Figment,
    proxy_env: &ProxyEnv,
    origin: String,
) -> Result<Loaded, ConfigError> {
    let mut config: Config = figment.extract().map_err(|e| ConfigError {
        problems: e.into_iter().map(problem_from_figment).collect(),
    })?;
    let mut problems = Vec::new();
    if config.upstream.proxy.is_none()
        && let Some((var, value)) = &proxy_env.https_proxy
    {
        match value.parse::<ProxyUrl>() {
            Ok(url) => {
                config.upstream.proxy = Some(url);
                if let Some(no_proxy) = &proxy_env.no_proxy {
                    config.upstream.no_proxy.extend(
                        no_proxy
                            .split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned),
                    );
                }
            }
            Err(message) => problems.push(Problem {
                key: "upstream.proxy".into(),
                message,
                origin: format!("environment variable {var}"),
            }),
        }
    }
    match validate(config, &figment, &mut problems) {
        Some((config, warnings)) => Ok(Loaded {
            config,
            warnings,
            origin,
        }),
        None => Err(ConfigError { problems }),
    }
}

fn problem_from_figment(e: figment::Error) -> Problem {
    let mut path = e.path.clone();
    if let figment::error::Kind::UnknownField(field, _) = &e.kind
        && path.last() != Some(field)
    {
        path.push(field.clone());
    }
    let origin = match &e.metadata {
        Some(md) => describe_origin(md, &path),
        None => "built-in default".into(),
    };
    Problem {
        key: if path.is_empty() {
            "(top level)".into()
        } else {
            path.join(".")
        },
        message: e.kind.to_string(),
        origin,
    }
}

fn describe_origin(md: &Metadata, path: &[String]) -> String {
    match &md.source {
        Some(source) => source.to_string(),
        None if md.name.contains("environment") => {
            let var: Vec<String> = path.iter().map(|p| p.to_ascii_uppercase()).collect();
            format!("environment variable {ENV_PREFIX}{}", var.join("__"))
        }
        None => md.name.to_string(),
    }
}

pub(super) fn origin_of(figment: &Figment, path: &[&str]) -> String {
    // figment finds metadata by dotted dictionary keys; list items are looked up by their list.
    let dict_path: Vec<&str> = path
        .iter()
        .take_while(|p| p.parse::<usize>().is_err())
        .copied()
        .collect();
    for len in (1..=dict_path.len()).rev() {
        if let Some(md) = figment.find_metadata(&dict_path[..len].join(".")) {
            let owned: Vec<String> = path.iter().map(|s| s.to_string()).collect();
            return describe_origin(md, &owned);
        }
    }
    "built-in default".into()
}
