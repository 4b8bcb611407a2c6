//! Configuration: a YAML file plus `PUSHRELAY_` environment overrides (`__` between levels), parsed
//! into types and validated before anything binds. Every problem names the key, the value and where
//! it came from (file or environment variable); all problems are reported at once, not one per run.
//! Relative paths are relative to the working directory.
//!
//! - `shape`: the serde shape (what the YAML file says) and its defaults.
//! - `values`: secrets, the proxy URL, serde through text; `duration` and `text`: value parsers.
//! - `load`: file + environment into the shape, with the origin of every value.
//! - `validate`: one check per section; its result, `ValidConfig`, is what `App` accepts.

pub mod duration;
mod load;
mod shape;
mod text;
mod validate;
mod values;

pub use load::{ConfigError, Loaded, Problem, ProxyEnv, destinations_in, from_yaml, load};
pub use shape::*;
pub use validate::*;
pub use values::{ProxyUrl, RelayUrl, Secret, read_proxy_users, read_secret};

#[cfg(test)]
mod tests {
    use super::load::{Yaml, extract};
    use super::*;
    use figment::Figment;
    use figment::providers::Format;
    use std::time::Duration;

    #[test]
    fn durations_need_units() {
        assert_eq!(duration::parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(duration::parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration::parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(duration::parse("1h"), Ok(Duration::from_secs(3600)));
        assert!(
            duration::parse("10")
                .unwrap_err()
                .contains("a unit is needed")
        );
        assert!(
            duration::parse("10 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(duration::parse("soon").unwrap_err().contains("\"soon\""));
        for d in ["250ms", "10s", "5m", "1h", "90s"] {
            assert_eq!(duration::format(&duration::parse(d).unwrap()), d);
        }
    }

    #[test]
    fn proxy_url_parses_credentials_and_masks_them() {
        let url: ProxyUrl = "http://user:s%40cret@proxy.corp.example:3128"
            .parse()
            .unwrap();
        assert_eq!(url.host, "proxy.corp.example");
        assert_eq!(url.port, 3128);
        assert_eq!(url.username.as_deref(), Some("user"));
        assert_eq!(url.password.as_ref().map(Secret::expose), Some("s@cret"));
        assert_eq!(url.to_string(), "http://user:***@proxy.corp.example:3128");
        assert_eq!(
            format!("{url:?}"),
            "http://user:***@proxy.corp.example:3128"
        );
        let bare: ProxyUrl = "proxy:8080".parse().unwrap();
        assert_eq!(bare.to_string(), "http://proxy:8080");
        let v6: ProxyUrl = "http://[::1]:3128/".parse().unwrap();
        assert_eq!(v6.address(), "[::1]:3128");
    }

    #[test]
    fn bad_proxy_urls_say_why_without_the_password() {
        let table = [
            ("https://user:pw@proxy:3128", "not supported"),
            ("socks5://proxy:1080", "not supported"),
            ("http://user:pw@proxy", "has no port"),
            ("http://proxy:3128/path", "must not have a path"),
            ("http://user:pw@pro xy:3128", "invalid host"),
        ];
        for (input, expected) in table {
            let err = input.parse::<ProxyUrl>().unwrap_err();
            assert!(err.contains(expected), "{input}: {err}");
            assert!(!err.contains("pw"), "{input}: password leaked in {err}");
        }
    }

    #[test]
    fn no_proxy_matches_hosts_and_domains() {
        let list: Vec<String> = vec![
            "apple.com".into(),
            ".example.org".into(),
            "exact.host".into(),
        ];
        assert!(Config::bypasses_proxy(&list, "api.push.apple.com"));
        assert!(Config::bypasses_proxy(&list, "apple.com"));
        assert!(Config::bypasses_proxy(&list, "a.example.org"));
        assert!(Config::bypasses_proxy(&list, "exact.host"));
        assert!(!Config::bypasses_proxy(&list, "notapple.com"));
        assert!(!Config::bypasses_proxy(&list, "fcm.googleapis.com"));
        assert!(Config::bypasses_proxy(&["*".into()], "anything"));
        assert!(!Config::bypasses_proxy(&[], "anything"));
    }

    #[test]
    fn defaults_are_a_loopback_apns_pre_proxy() {
        let c = Config::default();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].bind.to_string(), "127.0.0.1:8443");
        assert_eq!(c.listeners[0].mode, Mode::PreProxy);
        let sources: Vec<String> = c.listeners[0]
            .allow_sources
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sources, ["127.0.0.0/8", "::1/128"]);
        let dests: Vec<String> = c.destinations.iter().map(|d| d.to_string()).collect();
        assert_eq!(
            dests,
            [
                "api.push.apple.com:443",
                "api.sandbox.push.apple.com:443",
                "api.development.push.apple.com:443"
            ]
        );
    }

    #[test]
    fn figment_errors_name_key_and_value() {
        let err = from_yaml("upstream:\n  connect_timeout: 10\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("upstream.connect_timeout"), "{text}");
        assert!(text.contains("invalid duration 10"), "{text}");
        let err = from_yaml("listeners:\n  - name: a\n    mode: pre-proxy\n    bind: 127.0.0.1:1\n    allow_sources: [127.0.0.0/33]\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("listeners.0.allow_sources"), "{text}");
        let err = from_yaml("upstreams: {}\n").unwrap_err();
        assert!(err.to_string().contains("upstreams"), "{err}");
    }

    const PLAIN_LISTENER: &str =
        "listeners:\n  - name: plain\n    mode: post-proxy\n    bind: 127.0.0.1:0\n";

    #[test]
    fn https_proxy_from_environment_is_used_when_config_has_none() {
        let figment = Figment::new().merge(Yaml::string(PLAIN_LISTENER));
        let env = ProxyEnv {
            https_proxy: Some(("HTTPS_PROXY".into(), "http://u:p@proxy.corp:3128".into())),
            no_proxy: Some("localhost, .corp".into()),
        };
        let config = extract(figment, &env, "test".into()).unwrap().config;
        assert_eq!(
            config.upstream.proxy.clone().unwrap().to_string(),
            "http://u:***@proxy.corp:3128"
        );
        assert_eq!(config.upstream.no_proxy, ["localhost", ".corp"]);
    }

    #[test]
    fn configured_proxy_wins_over_https_proxy() {
        let yaml = format!("{PLAIN_LISTENER}upstream:\n  proxy: http://configured:3128\n");
        let env = ProxyEnv {
            https_proxy: Some(("HTTPS_PROXY".into(), "http://env:3128".into())),
            no_proxy: Some("apple.com".into()),
        };
        let config = extract(
            Figment::new().merge(Yaml::string(&yaml)),
            &env,
            "test".into(),
        )
        .unwrap()
        .config;
        assert_eq!(config.upstream.proxy.clone().unwrap().host, "configured");
        assert!(config.upstream.no_proxy.is_empty());
    }

    #[test]
    fn bad_https_proxy_names_the_variable() {
        let env = ProxyEnv {
            https_proxy: Some(("https_proxy".into(), "socks5://proxy:1080".into())),
            no_proxy: None,
        };
        let err = extract(Figment::new(), &env, "test".into()).unwrap_err();
        let p = err
            .problems
            .iter()
            .find(|p| p.key == "upstream.proxy")
            .unwrap();
        assert_eq!(p.origin, "environment variable https_proxy");
    }
}
